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
from ..data.contract import CaptionRecord, DataError, FeatureStore, check_ids, read_captions, write_captions
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
    **sampler_overrides,
) -> dict:
    """Caption every image of ``split`` with the ``teacher`` run and write the new captions file ``out``.

    ``sampler_overrides`` (beam_size=, precision=, ...) change the teacher's sampler settings. Images for
    which the teacher writes an empty caption keep their references (they are counted in the summary),
    so no image loses its training targets. Returns a summary: images, empty captions, seconds.
    """
    captions, features, out = Path(captions), Path(features), Path(out)
    if out.resolve() == captions.resolve():
        raise DataError(f"{out}: the output would overwrite the source captions file; choose another path")
    records = read_captions(captions)
    ids = list(dict.fromkeys(r.image_id for r in records if r.split == split))
    if not ids:
        splits = sorted({r.split for r in records})
        raise DataError(f"{captions}: no captions in split {split!r} (splits present: {splits})")
    store = FeatureStore.open(features)
    check_ids(records, store, captions)

    pipe = CaptionPipeline.from_pretrained(teacher, device=device)
    start = time.perf_counter()
    if captions_per_image == 1:
        texts = [[t] for t in pipe(store.get(ids), batch_size=batch_size, **sampler_overrides).texts]
    else:
        texts = beam_captions(pipe, store.get(ids), captions_per_image, batch_size, **sampler_overrides)
    seconds = time.perf_counter() - start

    taught = {
        i: distinct for i, t in zip(ids, texts) if (distinct := list(dict.fromkeys(c.strip() for c in t if c.strip())))
    }
    own = [r for r in records if r.split == split and (keep_references or r.image_id not in taught)]
    others = [r for r in records if r.split != split]
    new = [CaptionRecord(i, c, split) for i in ids if i in taught for c in taught[i]]
    write_captions(new + own + others, out)
    flat = [c for cs in taught.values() for c in cs]
    return {
        "teacher": str(teacher),
        "split": split,
        "images": len(ids),
        "teacher_captions": len(flat),
        "captions_per_image": captions_per_image,
        "empty": len(ids) - len(taught),
        "kept_references": len(own),
        "captioning_s": seconds,
        "mean_words": sum(len(t.split()) for t in flat) / max(len(flat), 1),
        "out": str(out),
    }


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
