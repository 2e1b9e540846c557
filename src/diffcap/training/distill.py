"""Sequence-level knowledge distillation: a teacher captioner re-captions the training images.

Non-autoregressive decoders, and a diffusion LM sampled in a few steps is one, predict every position at
once. When an image has several different reference captions, positions then mix words of different
captions ("a dog dog runs grass"). Training on one caption per image written by an autoregressive teacher
removes most of those modes: Kim & Rush 2016 (arXiv 1606.07947) introduced sequence-level distillation,
Gu et al. 2018 (arXiv 1711.02281) made it the standard recipe of non-autoregressive translation, and Zhou
et al. 2020 (arXiv 1911.02727) show that it works by lowering the data's complexity (fewer modes).

With ``captions_per_image = k`` an autoregressive teacher gives the k best hypotheses of its beam search
(distinct ones), as Kim & Rush 2016 and Zhou et al. 2020 suggest for more distillation data: the student
sees k times the captions, each still a single teacher mode, and memorises less of them.

With ``noisy_copies = n`` the teacher also captions n noise-perturbed copies of each image's condition
(Gaussian noise of standard deviation ``condition_noise`` per feature, the copy rescaled to the original's
norm), another way Kim & Rush 2016 and Zhou et al. 2020 point to for more distillation data: each copy is
a new condition with one teacher caption of its own, not a second mode of the same one. The copies are new
items of the split (``<image id>~noise<k>``) in a features file written next to ``out``, which also holds
every original item, so the student trains on it instead of the source's.

``distill_captions`` writes a captions file of the data contract in which the images of one split carry
the teacher's caption instead of (or, with ``keep_references``, in addition to) their own. The other
splits are copied unchanged, so validation keeps scoring against the real references. Train a diffusion
run on it like on any captions file (``data.captions=...``). No library offers this for captioning; it
is a short loop over :class:`~diffcap.pipeline.CaptionPipeline`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.contract import (
    CaptionRecord,
    DataError,
    FeatureStore,
    check_ids,
    read_captions,
    write_captions,
    write_features,
)
from ..pipeline import CaptionPipeline
from ..precision import sampling_in_bf16


def distill_captions(
    teacher: str | Path,
    captions: str | Path,
    features: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    keep_references: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    captions_per_image: int = 1,
    noisy_copies: int = 0,
    condition_noise: float = 0.0,
    seed: int = 0,
    **sampler_overrides,
) -> dict:
    """Caption every image of ``split`` with the ``teacher`` run and write the new captions file ``out``.

    ``sampler_overrides`` (beam_size=, precision=, ...) change the teacher's sampler settings. Images for
    which the teacher writes an empty caption keep their references (they are counted in the summary),
    so no image loses its training targets. ``noisy_copies`` > 0 adds that many captioned noise-perturbed
    conditions per image (module docstring), drawn from ``seed``, and writes the features file that the
    summary's ``features`` names. Returns a summary: images, empty captions, seconds.
    """
    captions, features, out = Path(captions), Path(features), Path(out)
    if out.resolve() == captions.resolve():
        raise DataError(f"{out}: the output would overwrite the source captions file; choose another path")
    if noisy_copies < 0 or (noisy_copies > 0) != (condition_noise > 0):
        raise ConfigError(
            f"noisy_copies={noisy_copies}, condition_noise={condition_noise}: noisy copies need a positive "
            "noise level, and a noise level needs copies"
        )
    features_out = out.with_name(f"{out.stem}_features.safetensors") if noisy_copies else features
    records = read_captions(captions)
    ids = list(dict.fromkeys(r.image_id for r in records if r.split == split))
    if not ids:
        splits = sorted({r.split for r in records})
        raise DataError(f"{captions}: no captions in split {split!r} (splits present: {splits})")
    store = FeatureStore.open(features)
    check_ids(records, store, captions)

    if noisy_copies and store.spec.is_pixels:
        raise ConfigError(f"{features}: holds pixels; noisy copies perturb feature vectors (encode the images first)")
    pipe = CaptionPipeline.from_pretrained(teacher, device=device)
    originals = store.get(ids)
    noisy = perturbed_conditions(originals, noisy_copies, condition_noise, seed)
    noisy_ids = [f"{i}~noise{k}" for k in range(noisy_copies) for i in ids]
    conditions = torch.cat([originals, noisy])  # the originals first, then the copies, as ids + noisy_ids
    start = time.perf_counter()
    if captions_per_image == 1:
        texts = [[t] for t in pipe(conditions, batch_size=batch_size, **sampler_overrides).texts]
    else:
        texts = beam_captions(pipe, conditions, captions_per_image, batch_size, **sampler_overrides)
    seconds = time.perf_counter() - start

    taught = {
        i: distinct
        for i, t in zip(ids + noisy_ids, texts)
        if (distinct := list(dict.fromkeys(c.strip() for c in t if c.strip())))
    }
    own = [r for r in records if r.split == split and (keep_references or r.image_id not in taught)]
    others = [r for r in records if r.split != split]
    new = [CaptionRecord(i, c, split) for i in ids + noisy_ids if i in taught for c in taught[i]]
    if noisy_copies:  # every original item, and the copies that got a caption
        kept = [j for j, i in enumerate(noisy_ids) if i in taught]
        items = store.all() | {noisy_ids[j]: noisy[j].clone() for j in kept}
        write_features(features_out, items, store.metadata | {"noisy_copies": f"{noisy_copies} x {condition_noise}"})
    write_captions(new + own + others, out)
    flat = [c for cs in taught.values() for c in cs]
    noisy_taught = sum(i in taught for i in noisy_ids)
    return {
        "teacher": str(teacher),
        "split": split,
        "images": len(ids),
        "teacher_captions": len(flat),
        "captions_per_image": captions_per_image,
        "empty": len(ids) + len(noisy_ids) - len(taught),
        "kept_references": len(own),
        "captioning_s": seconds,
        "mean_words": sum(len(t.split()) for t in flat) / max(len(flat), 1),
        "out": str(out),
        "features": str(features_out),
        "noisy_copies": noisy_copies,
        "condition_noise": condition_noise,
        "noisy_captions": noisy_taught,
        "noisy_cosine": mean_cosine(noisy, originals) if noisy_copies else None,
    }


def mean_cosine(noisy: torch.Tensor, originals: torch.Tensor) -> float:
    """The mean cosine similarity of each copy (copy-major, as :func:`perturbed_conditions` returns them)
    to its original: how far the noise moves a condition."""
    copies = len(noisy) // len(originals)
    return float(
        torch.nn.functional.cosine_similarity(
            noisy.flatten(1).float(), originals.flatten(1).float().repeat(copies, 1), dim=-1
        ).mean()
    )


def perturbed_conditions(features: torch.Tensor, copies: int, std: float, seed: int = 0) -> torch.Tensor:
    """``copies`` noisy versions of every item, copy-major ([copies * N x ...]): Gaussian noise of ``std``
    per feature, each vector (the last dimension) rescaled to its original norm, so a unit-norm sentence
    or CLIP embedding stays one."""
    generator = torch.Generator().manual_seed(seed)
    base = features.float().repeat(copies, *[1] * (features.dim() - 1))
    noisy = base + std * torch.randn(base.shape, generator=generator)
    return (noisy * (base.norm(dim=-1, keepdim=True) / noisy.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(
        features.dtype
    )


def beam_captions(
    pipe: CaptionPipeline, features: torch.Tensor, k: int, batch_size: int = 64, **sampler_overrides
) -> list[list[str]]:
    """The k best finished hypotheses of an autoregressive teacher's beam search for each item, best first."""
    sampler = pipe.sampler_config(**sampler_overrides)
    if getattr(pipe.model, "iterative", True) or sampler.beam_size < k:
        raise ConfigError(
            f"captions_per_image={k} takes the best k hypotheses of a beam search: it needs an autoregressive "
            f"teacher and beam_size >= {k} (got beam_size={sampler.beam_size})"
        )
    out: list[list[str]] = []
    autocast = torch.autocast(
        pipe.device.type, dtype=torch.bfloat16, enabled=sampling_in_bf16(sampler.precision, pipe.device)
    )
    with torch.no_grad(), autocast:
        for start in range(0, len(features), batch_size):
            batch = features[start : start + batch_size].to(pipe.device)
            ids = pipe.model.search(batch, max_length=pipe.model.seq_len, beam_size=sampler.beam_size, num_return=k)
            out += [pipe.tokenizer.decode(item.cpu()) for item in ids]
    return out
