"""`diffcap prepare`: a data set layout on disk -> a data directory of the contract.

    OUT/captions.jsonl              caption records, split by image
    OUT/features/                   pooled features keyed by image id (metadata: encoder, kind, output): a
                                    sharded store, shard-NNNNN.safetensors + index.json (data/store.py)
    OUT/patch_features/             the CLIP patch grid, with ``patch_tokens``; a store like features/
    OUT/features.safetensors        instead of features/ with ``condition="text"``: one file, small
    OUT/prepare.json                what was done: layout, encoder, counts per split, images left out

Two conditions:

* ``image``: frozen CLIP image features of every image.
* ``text``: text-only training in the manner of CapDec (Nukrai et al., arXiv 2211.00575). Caption #k
  of each image (file order) is encoded by a text encoder and stands in for the image; it is removed
  from that image's targets, so the model never learns to copy its condition. At training time,
  ``data.feature_noise_std`` adds CapDec's Gaussian noise to bridge the text-image gap. No image is read.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from ..io import atomic_output, write_json
from .contract import CaptionRecord, DataError, describe_ids, write_captions
from .encoders import (
    DEFAULT_ENCODER,
    TEXT_FEATURES_FILE,
    ClipImageEncoder,
    TextEncoder,
    extract_image_features,
    write_text_features,
)
from .layouts import Layout, read_layout

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"
DEFAULT_SHARD_SIZE = 2048  # images per resumable shard


def split_condition_caption(layout: Layout, k: int) -> tuple[dict[str, str], list[CaptionRecord]]:
    """(image id -> caption #k, the other captions as targets). Every image needs caption #k and at
    least one more caption to be a target."""
    grouped = layout.captions_by_image()
    short = [i for i, rs in grouped.items() if len(rs) < k + 2]
    if short:
        raise DataError(
            f"{describe_ids(short)} have fewer than {k + 2} captions: caption #{k} is the "
            "condition and at least one other caption must remain as a target"
        )
    conditions = {i: rs[k].caption for i, rs in grouped.items()}
    targets = [r for rs in grouped.values() for j, r in enumerate(rs) if j != k]
    return conditions, targets


def prepare(
    layout_name: str,
    root: str | Path,
    out: str | Path,
    *,
    encoder: str = DEFAULT_ENCODER,
    captions: str | Path | None = None,
    condition: str = "image",
    text_encoder: str | None = None,
    condition_caption: int = 0,
    patch_tokens: bool = False,
    batch_size: int = 64,
    shard_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Read ``layout_name`` from ``root`` and write the data directory ``out``; returns the summary
    that is also written to ``OUT/prepare.json``.

    ``patch_tokens``, ``shard_size`` (default 2048), ``workers`` (default 0) and ``skip_bad`` concern
    images only: with ``condition="text"`` they are ignored, with a warning when given.
    """
    out = Path(out)
    layout = read_layout(layout_name, root, captions=captions)
    check_not_overwriting(layout_name, root, out, layout)
    summary: dict = {"layout": layout_name, "root": str(Path(root).resolve()), "condition": condition}
    if condition == "image":
        clip = ClipImageEncoder(encoder, device=device, dtype=dtype, patch_tokens=patch_tokens)
        done = extract_image_features(
            layout.images,
            out,
            clip,
            batch_size=batch_size,
            shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
            workers=0 if workers is None else workers,
            skip_bad=skip_bad,
            progress=progress,
        )
        bad = {image_id for image_id, _ in done.bad}
        records = [r for r in layout.records if r.image_id not in bad]
        summary |= {
            "encoder": clip.model_id,
            "kind": "clip-image",
            "files": {k: str(v) for k, v in done.files.items()},
            "images_left_out": len(bad),
            "shards_reused": done.reused_shards,
            "shards_computed": done.computed_shards,
        }
    elif condition == "text":
        if condition_caption < 0:
            raise ValueError(f"--condition-caption must be >= 0, got {condition_caption}")
        given = [
            flag
            for flag, value in (
                ("--patch-tokens", patch_tokens),
                ("--skip-bad", skip_bad),
                ("--workers", workers is not None),
                ("--shard-size", shard_size is not None),
            )
            if value
        ]
        if given:
            log.warning("%s: image options only; ignored with --condition text", ", ".join(given))
        text = TextEncoder(text_encoder or encoder, device=device, dtype=dtype, batch_size=batch_size)
        conditions, records = split_condition_caption(layout, condition_caption)
        write_text_features(
            out / TEXT_FEATURES_FILE,
            conditions,
            text,
            progress=progress,
            metadata={"condition": f"caption #{condition_caption}"},
        )
        summary |= {
            "encoder": text.encoder,
            "kind": text.kind,
            "condition_caption": condition_caption,
            "files": {"pooled": str(out / TEXT_FEATURES_FILE)},
        }
    else:
        raise ValueError(f"condition {condition!r}: choose image or text")
    write_captions(records, out / CAPTIONS_FILE)
    per_split = Counter(r.split for r in records)
    images_per_split = Counter(split for split in {r.image_id: r.split for r in records}.values())
    summary |= {"captions": dict(per_split), "images": dict(images_per_split)}
    write_json(out / "prepare.json", summary)
    log.info("prepared %s: %s", out, summary)
    return summary


def check_not_overwriting(layout_name: str, root: str | Path, out: Path, layout: Layout) -> None:
    """prepare writes OUT/captions.jsonl: it must not be the file the captions are read from, and
    with the folder layout OUT must not be the data set folder itself (whose captions.jsonl is the
    source by default)."""
    target = (out / CAPTIONS_FILE).resolve()
    source = layout.captions_file
    if source is not None and (target == source.resolve() or (target.exists() and target.samefile(source))):
        raise DataError(
            f"--out {out}: would overwrite the source captions {source} with {out / CAPTIONS_FILE}; "
            "write the data directory elsewhere"
        )
    if layout_name == "folder" and out.resolve() == Path(root).resolve():
        raise DataError(
            f"--out {out} is the data set folder --root {root}: prepare would write "
            f"{out / CAPTIONS_FILE} next to (or over) the source captions {source}; "
            "write the data directory elsewhere"
        )


def fetch_from_hub(name: str, root: str | Path, *, progress: bool = True) -> Path:
    """Download a captioning data set with the ``datasets`` library into the folder layout at ``root``.

    Online only, and untested offline: the data set needs an ``image`` column and a caption column
    (``caption``, ``captions``, ``sentences`` or ``text``; a list gives one record per caption). Its
    splits become the contract's (``validation`` -> ``val``). Images are saved as JPEG files.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ValueError("--from-hub needs the datasets library: pip install datasets") from exc
    from tqdm.auto import tqdm

    root = Path(root)
    splits = datasets.load_dataset(name)
    records: list[CaptionRecord] = []
    for split_name, rows in splits.items():
        split = {"validation": "val", "restval": "train"}.get(split_name, split_name)
        column = next((c for c in ("caption", "captions", "sentences", "text") if c in rows.column_names), None)
        if "image" not in rows.column_names or column is None:
            raise DataError(
                f"{name}: split {split_name!r} has columns {rows.column_names}; need 'image' and a caption column"
            )
        for n, row in enumerate(tqdm(rows, desc=f"{name}/{split_name}", disable=not progress)):
            image_id = f"{split}/{n:07d}.jpg"
            with atomic_output(root / image_id) as tmp:
                row["image"].convert("RGB").save(tmp, format="JPEG", quality=95)
            texts = row[column] if isinstance(row[column], list) else [row[column]]
            records += [CaptionRecord(image_id, t if isinstance(t, str) else t["raw"], split) for t in texts]
    write_captions(records, root / "captions.jsonl")
    return root
