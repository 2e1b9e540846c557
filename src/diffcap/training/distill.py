"""Sequence-level knowledge distillation: a teacher captioner re-captions the training images.

Non-autoregressive decoders, and a diffusion LM sampled in a few steps is one, predict every position at
once. When an image has several different reference captions, positions then mix words of different
captions ("a dog dog runs grass"). Training on one caption per image written by an autoregressive teacher
removes most of those modes: Kim & Rush 2016 (arXiv 1606.07947) introduced sequence-level distillation,
Gu et al. 2018 (arXiv 1711.02281) made it the standard recipe of non-autoregressive translation, and Zhou
et al. 2020 (arXiv 1911.02727) show that it works by lowering the data's complexity (fewer modes).

``distill_captions`` writes a captions file of the data contract in which the images of one split carry
the teacher's caption instead of (or, with ``keep_references``, in addition to) their own. The other
splits are copied unchanged, so validation keeps scoring against the real references. Train a diffusion
run on it like on any captions file (``data.captions=...``). No library offers this for captioning; it
is a short loop over :class:`~diffcap.pipeline.CaptionPipeline`.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..data.contract import CaptionRecord, DataError, FeatureStore, check_ids, read_captions, write_captions
from ..pipeline import CaptionPipeline


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
    texts = pipe(store.get(ids), batch_size=batch_size, **sampler_overrides).texts
    seconds = time.perf_counter() - start

    taught = {i: t.strip() for i, t in zip(ids, texts) if t.strip()}
    own = [r for r in records if r.split == split and (keep_references or r.image_id not in taught)]
    others = [r for r in records if r.split != split]
    write_captions([CaptionRecord(i, taught[i], split) for i in ids if i in taught] + own + others, out)
    return {
        "teacher": str(teacher),
        "split": split,
        "images": len(ids),
        "teacher_captions": len(taught),
        "empty": len(ids) - len(taught),
        "kept_references": len(own),
        "captioning_s": seconds,
        "mean_words": sum(len(t.split()) for t in taught.values()) / max(len(taught), 1),
        "out": str(out),
    }
