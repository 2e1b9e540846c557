"""Token recovery per noise level: how much of a caption the denoiser restores in one step from x_t.

The seed log's restoration measure ("restore till x_20 / x_30"), which found the high-noise
bottleneck: noise the embedded true caption to x_t ~ q(x_t | x_0), take the network's x0 estimate at t
(as the sampler's first step does: no previous estimate, no guidance), round it to the nearest
embeddings, and count the tokens that come back. A model that restores nothing above some t has to
write its caption in the few steps below it, whatever the sampler's step count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.contract import DataError, FeatureStore, read_captions
from ..io import PathLike, write_json
from ..pipeline import CaptionPipeline
from .plot import line_chart


@dataclass
class Recovery:
    t: int
    tokens: float  # share of all positions (padding included) rounded back to the true token
    words: float  # share of the caption's non-padding positions rounded back to the true word
    captions: float  # share of captions restored exactly


def spaced_timesteps(num_timesteps: int, count: int) -> list[int]:
    """``count`` timesteps spread evenly from 0 to T-1, both ends included."""
    count = max(2, min(count, num_timesteps))
    return sorted({round(k * (num_timesteps - 1) / (count - 1)) for k in range(count)})


@torch.no_grad()
def token_recovery(
    pipe: CaptionPipeline,
    ids: torch.Tensor,
    features: torch.Tensor,
    timesteps: list[int],
    *,
    seed: int = 0,
    batch_size: int = 64,
) -> list[Recovery]:
    """Recovery of the captions ``ids`` [N x L] given their images' ``features``, at each of ``timesteps``.
    One noise draw per caption (seeded) is shared by every t, so the rows differ only by the noise level."""
    model = pipe.model
    if not getattr(model, "iterative", False):
        raise ValueError(f"diagnose measures a diffusion denoiser; {type(model).__name__} has none")
    device, pad = pipe.device, model.pad_id
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(*ids.shape, model.embedding.dim, generator=generator)
    rows = []
    for t in timesteps:
        same = torch.zeros(0, dtype=torch.bool)
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size].to(device)
            cond = model.encode_condition(features[start : start + batch_size].to(device))
            tt = torch.full((len(batch),), t, dtype=torch.long, device=device)
            x_t = model.diffusion.q_sample(model.embedding(batch), tt, noise[start : start + len(batch)].to(device))
            self_cond = torch.zeros_like(x_t) if model.cfg.self_condition else None
            x0 = model.diffusion.predict_x0(model(x_t, tt, cond, self_cond), x_t, tt)
            same = torch.cat([same, (model.embedding.nearest(x0) == batch).cpu()])
        words = ids != pad
        rows.append(
            Recovery(
                t=t,
                tokens=float(same.float().mean()),
                words=float((same & words).sum() / words.sum().clamp(min=1)),
                captions=float(same.all(dim=1).float().mean()),
            )
        )
    return rows


def markdown_table(rows: list[Recovery]) -> str:
    lines = ["| t | tokens | words | captions |", "|---:|---:|---:|---:|"]
    lines += [f"| {r.t} | {r.tokens:.3f} | {r.words:.3f} | {r.captions:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def diagnose_run(
    run: PathLike,
    captions: PathLike,
    features: PathLike,
    out_dir: PathLike,
    *,
    split: str = "val",
    max_captions: int = 200,
    points: int = 21,
    seed: int = 0,
    device: str = "cpu",
) -> list[Recovery]:
    """Token recovery of the first ``max_captions`` captions of ``split`` at ``points`` noise levels.
    Writes OUT/recovery.json, OUT/recovery.md and the plot OUT/recovery.png; returns the rows."""
    pipe = CaptionPipeline.from_pretrained(run, device=device)
    records = [r for r in read_captions(captions) if r.split == split][:max_captions]
    if not records:
        raise DataError(f"{captions}: no captions in split {split!r}")
    store = FeatureStore.open(features)
    feats = store.get([r.image_id for r in records])
    pipe.check_features(feats, str(features))
    ids = pipe.tokenizer.encode([r.caption for r in records])
    timesteps = spaced_timesteps(pipe.cfg.diffusion.num_timesteps, points)
    rows = token_recovery(pipe, ids, feats, timesteps, seed=seed)

    out = Path(out_dir)
    summary = {"run": str(run), "split": split, "captions": len(records), "seed": seed}
    write_json(out / "recovery.json", {**summary, "rows": [vars(r) for r in rows]})
    (out / "recovery.md").write_text(
        f"Token recovery of the one-step x0 estimate from x_t of the true caption ({len(records)} captions "
        f"of split {split}, {run}).\n\n" + markdown_table(rows)
    )
    line_chart(
        out / "recovery.png",
        [r.t for r in rows],
        {"words": [r.words for r in rows], "tokens": [r.tokens for r in rows], "captions": [r.captions for r in rows]},
        title=f"token recovery from x_t: {Path(run).name}, {split}",
        xlabel="timestep t (noise grows to the right)",
        ylabel="recovered",
    )
    return rows
