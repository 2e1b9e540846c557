"""Sampling: DDIM, DDPM ancestral, the seed's refine-without-re-noising loop, and mask-predict.

The loop follows diffusers' set_timesteps / step contract and uses its DDIM and DDPM schedulers on our
own betas. We always hand the scheduler an x0 estimate (``prediction_type="sample"``), because the
steps between the network and the scheduler work on x0: objective conversion, classifier-free
guidance, classifier guidance (:mod:`diffcap.diffusion.guidance`) and Diffusion-LM's clamping trick (each a
small function). All randomness goes through
one ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..config import SamplerConfig
from .diffusion import GaussianDiffusion
from .guidance import classifier_shift


def make_scheduler(method: str, diffusion: GaussianDiffusion, steps: int):
    common = dict(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion.betas.cpu().numpy(),
        prediction_type="sample",
        clip_sample=False,
        # "trailing" starts at t = T-1, i.e. from pure noise, even with very few steps
        # (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
        timestep_spacing="trailing",
    )
    if method == "ddim":
        scheduler = DDIMScheduler(**common, set_alpha_to_one=True)
    elif method in ("ddpm", "refine"):
        scheduler = DDPMScheduler(**common)
    else:
        raise ValueError(f"unknown sampler {method!r}; choose ddim, ddpm or refine")
    scheduler.set_timesteps(steps)
    return scheduler


def guide(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the x0 estimate (Ho & Salimans 2022, arXiv 2207.12598)."""
    return x0_uncond + scale * (x0_cond - x0_uncond)


@dataclass
class SampleOutput:
    ids: torch.Tensor  # [B x L]
    # (t, [B x L] ids of x0_hat) per step; for mask-predict t is T-1 times the share of the positions
    # that step predicted afresh (all at step 1, fewer at each later step)
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class Sampler:
    """Turns condition features into token ids with a trained captioner."""

    def __init__(
        self, model, diffusion: GaussianDiffusion, cfg: SamplerConfig, seq_len: int, pad_id: int = 0, classifier=None
    ):
        self.model, self.diffusion, self.cfg, self.seq_len, self.pad_id = model, diffusion, cfg, seq_len, pad_id
        if cfg.classifier_scale > 0 and classifier is None:
            raise ValueError("sampler.classifier_scale > 0 needs a guidance classifier")
        self.classifier = classifier

    def _x0(self, x_t, t, cond, self_cond, want_logits: bool = False):
        x0, logits = self._x0_model(x_t, t, cond, self_cond, want_logits)
        if self.cfg.classifier_scale > 0:
            tt = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
            x0 = x0 + self.cfg.classifier_scale * classifier_shift(
                self.classifier, self.diffusion.alpha_bar, x_t, tt, cond
            )
        if want_logits and logits is None:  # the tied rounding head on the x0 estimate
            logits = self.model.embedding.logits(x0)
        return x0, logits

    def _x0_model(self, x_t, t, cond, self_cond, want_logits: bool = False):
        """One network evaluation (two with guidance) -> (x0 estimate [B x L x D], the network's own
        rounding logits [B x L x A] when asked for and it has them (score interpolation), else None)."""
        batch = x_t.shape[0]
        per_position = torch.is_tensor(t) and t.dim() == 2  # [B x L] (mask-predict), else one time for all
        tt = t if per_position else torch.full((batch,), int(t), device=x_t.device, dtype=torch.long)
        # the time the network is told (asymmetric time intervals); the objective converts at the true t
        t_net = tt.add(self.cfg.time_offset).clamp(max=self.diffusion.num_timesteps - 1)
        extra = {"return_logits": True} if want_logits else {}
        scale = self.cfg.guidance_scale
        if scale == 1.0:
            out = self.model(x_t, t_net, cond, self_cond, None, **extra)
            out, logits = out if want_logits else (out, None)
            return self.diffusion.predict_x0(out, x_t, tt), logits
        two = lambda z: None if z is None else torch.cat([z, z])  # noqa: E731
        drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)]).to(x_t.device)
        out = self.model(two(x_t), two(t_net), two(cond), two(self_cond), drop, **extra)
        out, logits = out if want_logits else (out, None)
        x0 = self.diffusion.predict_x0(out, two(x_t), torch.cat([tt, tt]))
        if logits is not None:
            logits = guide(logits[:batch], logits[batch:], scale)
        return guide(x0[:batch], x0[batch:], scale), logits

    @torch.no_grad()
    def sample(
        self, features: torch.Tensor, generator: torch.Generator | None = None, trajectory: bool = False
    ) -> SampleOutput:
        """features [B x ...] -> ids [B x L]; with ``cfg.mbr = k`` it draws k samples per input and keeps
        the minimum-Bayes-risk one."""
        k = self.cfg.mbr
        cond = self.model.encode_condition(features)
        if k > 1:
            cond = cond.repeat_interleave(k, dim=0)
        loop = self._mask_predict_loop if self.cfg.method == "mask_predict" else self._loop
        out = loop(cond, generator, trajectory)
        if self.cfg.collapse_repeats:
            out.ids = collapse_repeats(out.ids, self.pad_id)
        if k > 1:
            out = select_mbr(out, k, self.pad_id)
        return out

    def _loop(self, cond, generator, want_trajectory) -> SampleOutput:
        emb = self.model.embedding
        batch, device = cond.shape[0], cond.device
        scheduler = make_scheduler(self.cfg.method, self.diffusion, self.cfg.steps)
        x = torch.randn((batch, self.seq_len, emb.dim), generator=generator, device=device)
        self_cond = torch.zeros_like(x) if self.model.cfg.self_condition else None
        traj: list[tuple[int, torch.Tensor]] = []
        x0 = x
        content = None  # the caption layout [B x L] once sampler.length = "expected" has fixed it
        for t in scheduler.timesteps:
            fix_length = self.cfg.length == "expected" and content is None
            x0, logits = self._x0(x, t, cond, self_cond, want_logits=fix_length)
            if fix_length:
                content = expected_length_layout(logits, emb.allowed_position(torch.tensor(self.pad_id)))
            if self_cond is not None:
                self_cond = x0
            if self.cfg.clamp:
                x0 = emb.clamp(x0, content, self.pad_id)
            elif content is not None:  # without clamping only the padding is fixed
                x0 = torch.where(content[..., None], x0, emb(torch.full_like(content, self.pad_id, dtype=torch.long)))
            if want_trajectory:
                traj.append((int(t), emb.nearest(x0, content, self.pad_id).cpu()))
            if self.cfg.method == "refine":
                x = x0  # the seed's loop: feed the estimate back in, never re-noise
            else:
                x = scheduler.step(x0, t, x, generator=generator).prev_sample
        return SampleOutput(ids=emb.nearest(x0, content, self.pad_id), trajectory=traj)

    def _mask_predict_loop(self, cond, generator, want_trajectory) -> SampleOutput:
        """Mask-predict (CMLM, Ghazvininejad et al. 2019, arXiv 1904.09324) with Gaussian noise as the
        mask, for a model trained with diffusion.mask_predict_prob > 0.

        Step 1 predicts every position from pure noise at t = T-1, like one DDIM step; its padding fixes
        the length (CMLM predicts the length first). Step k+1 of S keeps the words it is most confident
        of as clean embeddings told t = 0, re-noises the n least confident of the N words to t = T-1
        (:func:`renoise_count`: N (S-1-k) / S, CMLM's linear decay, or MaskGIT's cosine one), and predicts
        those again, never as padding; kept positions keep their word and confidence. With ``clamp`` a
        word is the embedding nearest to the x0 estimate, as the DDIM sampler rounds (with score
        interpolation x0 is the expected embedding, whose nearest word can differ from the likeliest);
        without it the argmax of the rounding logits. Its confidence is its probability under the logits.

        With ``length_beam = b > 1`` step 1 fixes b layouts per caption instead of one, the b likeliest
        lengths under its PAD probabilities (:func:`length_candidates`); the later steps refine all of them
        in one batch, and each caption keeps the candidate with the highest mean log confidence.
        """
        emb = self.model.embedding
        batch, device = cond.shape[0], cond.device
        seq_len, steps, top = self.seq_len, self.cfg.steps, self.diffusion.num_timesteps - 1
        ids, rows = emb.allowed_rows()
        pad_column = emb.allowed_position(torch.tensor(self.pad_id, device=device))
        a_top, s_top = self.diffusion.a[top], self.diffusion.s[top]
        x = torch.randn((batch, seq_len, emb.dim), generator=generator, device=device)
        t = torch.full((batch, seq_len), top, device=device, dtype=torch.long)
        renoised = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        self_cond = torch.zeros_like(x) if self.model.cfg.self_condition else None
        traj: list[tuple[int, torch.Tensor]] = []
        words = confidence = content = None
        beam = min(self.cfg.length_beam, seq_len)
        for k in range(steps):
            x0, logits = self._x0(x, t, cond, self_cond, want_logits=True)
            if self_cond is not None:
                self_cond = x0
            probs = logits.float().softmax(dim=-1)
            if k == 0 and beam > 1:  # every caption becomes `beam` candidates, one per likely length
                content = length_candidates(probs[..., pad_column], beam)
                x0, probs, cond, renoised = (z.repeat_interleave(beam, dim=0) for z in (x0, probs, cond, renoised))
                self_cond = None if self_cond is None else self_cond.repeat_interleave(beam, dim=0)
            if content is not None:
                probs[..., pad_column] = 0  # the length is fixed: a word position stays a word
            if self.cfg.clamp:
                best = emb.nearest_index(x0, content, self.pad_id)
            else:
                best = probs.argmax(dim=-1)
                best = best if content is None else best.masked_fill(~content, int(pad_column))
            prob = probs.gather(2, best[..., None])[..., 0]
            if words is None:
                words, confidence = best, prob
                content = words != pad_column if content is None else content
            else:
                words, confidence = torch.where(renoised, best, words), torch.where(renoised, prob, confidence)
            if want_trajectory:
                traj.append((round(top * float(renoised.float().mean())), ids[words].cpu()))
            n = renoise_count(content.sum(dim=1, keepdim=True), k, steps, self.cfg.mask_schedule)
            if not n.any():
                break
            rank = confidence.masked_fill(~content, float("inf")).argsort(dim=1).argsort(dim=1)
            renoised = rank < n  # the n least confident words of each caption
            clean = rows[words]
            eps = torch.randn(clean.shape, generator=generator, device=device)
            x = torch.where(renoised[..., None], a_top * clean + s_top * eps, clean)
            t = torch.where(renoised, top, 0)
        if beam > 1:
            score = (confidence.clamp_min(1e-12).log() * content).sum(dim=1) / content.sum(dim=1).clamp(min=1)
            keep = score.view(-1, beam).argmax(dim=1) + torch.arange(0, len(score), beam, device=device)
            words, traj = words[keep], [(step_t, step_ids[keep.cpu()]) for step_t, step_ids in traj]
        return SampleOutput(ids=ids[words], trajectory=traj)


def renoise_count(words: torch.Tensor, k: int, steps: int, schedule: str = "linear") -> torch.Tensor:
    """How many of ``words`` (an integer tensor) mask-predict re-noises after step k (0-based) of ``steps``:
    ``sampler.mask_schedule``'s linear N (S-1-k) / S or cosine N cos(pi/2 (k+1) / S), rounded down; 0 after
    the last step (cos(pi/2) N floors to 0)."""
    if schedule == "cosine":
        return (words * math.cos(math.pi / 2 * (k + 1) / steps)).floor().long()
    return words * (steps - 1 - k) // steps


def length_candidates(p_pad: torch.Tensor, beam: int) -> torch.Tensor:
    """[B x L] P(PAD) per position -> layouts [B*beam x L] of each caption's ``beam`` likeliest lengths.

    Length n (1..L) scores sum_{i<n} log(1 - P_i(PAD)) + sum_{i>=n} log P_i(PAD): the positions taken as
    independent, as the rounding head predicts them. Candidates of one caption are adjacent rows, the
    likeliest first.
    """
    p = p_pad.float().clamp(1e-6, 1 - 1e-6)
    word_before = (1 - p).log().cumsum(dim=1)  # column n-1: sum over i < n
    pad_from = p.log().flip(1).cumsum(dim=1).flip(1)  # column i: sum over j >= i
    pad_after = torch.cat([pad_from[:, 1:], torch.zeros_like(pad_from[:, :1])], dim=1)  # column n-1: j >= n
    lengths = (word_before + pad_after).topk(beam, dim=1).indices + 1  # [B x beam]
    positions = torch.arange(p.shape[1], device=p.device)
    return (positions[None, None] < lengths[..., None]).reshape(-1, p.shape[1])


def expected_length_layout(logits: torch.Tensor, pad_column: torch.Tensor) -> torch.Tensor:
    """[B x L x A] rounding logits -> layout [B x L], True for the first n positions, where n is the
    expected number of non-PAD positions, sum_i (1 - P_i(PAD)), rounded, at least 1."""
    p_pad = logits.float().softmax(dim=-1)[..., int(pad_column)]
    n = (1 - p_pad).sum(dim=-1).round().clamp(min=1)
    return torch.arange(logits.shape[1], device=logits.device)[None] < n[:, None]


def collapse_repeats(ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """[B x L] ids with every token equal to its left neighbour removed, the rest moved left and padded.

    Works on WordPiece ids, so repeated pieces go too ("skate ##board ##board" -> "skate ##board").
    """
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] != pad_id)
    out = torch.full_like(ids, pad_id)
    for row, (tokens, drop) in enumerate(zip(ids, repeat)):
        kept = tokens[~drop]
        out[row, : len(kept)] = kept
    return out


def _ngrams(ids: list[int], n: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        key = tuple(ids[i : i + n])
        counts[key] = counts.get(key, 0) + 1
    return counts


def ngram_f1(a: list[int], b: list[int], max_n: int = 2) -> float:
    """Mean unigram..max_n-gram F1 between two token lists: the MBR utility.

    Hand-written because MBR needs a cheap symmetric similarity for k^2 pairs, not a corpus metric.
    """
    scores = []
    for n in range(1, max_n + 1):
        ca, cb = _ngrams(a, n), _ngrams(b, n)
        overlap = sum(min(v, cb.get(g, 0)) for g, v in ca.items())
        total = sum(ca.values()) + sum(cb.values())
        if total:  # orders longer than both sequences carry no evidence either way
            scores.append(2 * overlap / total)
    return sum(scores) / len(scores) if scores else 1.0


def select_mbr(out: SampleOutput, k: int, pad_id: int = 0) -> SampleOutput:
    """Minimum Bayes risk: among each group of k samples keep the one most similar to the others
    (Kumar & Byrne 2004; used for diffusion LMs by Diffusion-LM and DiffuSeq)."""
    ids = out.ids
    groups = ids.shape[0] // k
    keep = []
    for g in range(groups):
        cands = [[tok for tok in row.tolist() if tok != pad_id] for row in ids[g * k : (g + 1) * k]]
        utility = [sum(ngram_f1(c, o) for j, o in enumerate(cands) if j != i) for i, c in enumerate(cands)]
        keep.append(g * k + max(range(k), key=lambda i: utility[i]))
    index = torch.tensor(keep, device=ids.device)
    traj = [(t, step[index.cpu()]) for t, step in out.trajectory]
    return SampleOutput(ids=ids[index], trajectory=traj)
