"""Caption/feature pairs for training and per-image references for evaluation, from the data contract."""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..text.tokenizer import CaptionTokenizer
from .contract import CaptionRecord, DataError, FeatureStore

log = logging.getLogger(__name__)

# Captions per tokenizer call. The fast tokenizer builds a Python object per caption of a call (about
# 3 KB each), so tokenizing 100k captions at once peaked 0.34 GB above the process's baseline; in
# chunks the peak stays that of one chunk, whatever the number of captions.
_TOKENIZE_CHUNK = 8192


class FeatureRows:
    """The features of ``image_ids``, in that order, read from the store when indexed: ``rows[i]``,
    ``rows[a:b]``, ``rows[list or tensor of indices]``. A split of a store larger than memory is held
    as this, so a training process reads only the rows of its own batches."""

    def __init__(self, store: FeatureStore, image_ids: list[str]):
        self.store, self.image_ids = store, image_ids
        self.shape = (len(image_ids), *store.item_shape)
        self.dtype = store.dtype

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return self.store.get(self.image_ids[index])
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            index = int(index)
        if isinstance(index, (torch.Tensor, list, tuple)):
            return self.store.get([self.image_ids[i] for i in torch.as_tensor(index).tolist()])
        return self.store.get([self.image_ids[operator.index(index)]])[0]


@dataclass
class SplitData:
    """One split: unique images with their features and references, and every caption as token ids."""

    name: str
    image_ids: list[str]  # unique images, in file order
    features: torch.Tensor | FeatureRows  # [n_images x ...] aligned with image_ids
    references: dict[str, list[str]]
    caption_ids: torch.Tensor  # [n_captions x L]
    caption_image: torch.Tensor  # [n_captions] index into image_ids

    def subset(self, n: int) -> "SplitData":
        """The first n captions and their images (the seed's overfit-first trials)."""
        keep = self.caption_image[:n]
        images = sorted(set(keep.tolist()))
        remap = {old: new for new, old in enumerate(images)}
        ids = [self.image_ids[i] for i in images]
        return SplitData(
            self.name,
            ids,
            self.features[images],
            {i: self.references[i] for i in ids},
            self.caption_ids[:n],
            torch.tensor([remap[i] for i in keep.tolist()]),
        )


def load_split(
    records: list[CaptionRecord],
    store: FeatureStore,
    tokenizer: CaptionTokenizer,
    split: str,
    captions_path: str | Path = "captions",
) -> SplitData:
    rows = [r for r in records if r.split == split]
    if not rows:
        found = sorted({r.split for r in records})
        raise DataError(f"{captions_path}: no captions in split {split!r} (splits present: {found})")
    image_ids = list(dict.fromkeys(r.image_id for r in rows))
    missing = store.missing(image_ids)
    if missing:
        raise DataError(f"{store.path}: no features for {len(missing)} image(s) of {captions_path}, e.g. {missing[:5]}")
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    references: dict[str, list[str]] = {i: [] for i in image_ids}
    for r in rows:
        references[r.image_id].append(r.caption)
    captions = [r.caption for r in rows]
    chunks = [captions[i : i + _TOKENIZE_CHUNK] for i in range(0, len(captions), _TOKENIZE_CHUNK)]
    lengths = [n for chunk in chunks for n in tokenizer.lengths_before_truncation(chunk)]
    # A caption with no tokens at all (e.g. only characters the tokenizer drops) would train the
    # model to emit nothing: an error here rather than a silently useless example.
    empty = [r for r, n in zip(rows, lengths) if n == 0]
    if empty:
        shown = ", ".join(f"{r.image_id!r} ({r.caption!r})" for r in empty[:5])
        raise DataError(
            f"{captions_path}: {len(empty)} {split} caption(s) have no tokens (all PAD), "
            f"for image(s) {shown}{' and more' if len(empty) > 5 else ''}"
        )
    long_rows = [r for r, n in zip(rows, lengths) if n > tokenizer.max_length]
    if long_rows:
        log.warning(
            "%s: %d of %d %s captions are longer than max_length=%d tokens and were truncated (e.g. for image(s) %s)",
            captions_path,
            len(long_rows),
            len(rows),
            split,
            tokenizer.max_length,
            ", ".join(repr(r.image_id) for r in long_rows[:5]),
        )
    return SplitData(
        name=split,
        image_ids=image_ids,
        features=FeatureRows(store, image_ids),
        references=references,
        caption_ids=torch.cat([tokenizer.encode(chunk) for chunk in chunks]),
        caption_image=torch.tensor([index[r.image_id] for r in rows]),
    )


class CaptionPairs(Dataset):
    """(token ids [L], features [...], caption index) for every caption of a split; the index lets
    the trainer name the images of a batch whose loss is not finite.

    A DataLoader fetches a whole batch with :meth:`__getitems__`: one call to the store for all of
    its rows instead of one per caption."""

    def __init__(self, split: SplitData):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.caption_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.split.caption_ids[i], self.split.features[self.split.caption_image[i]], i

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        feats = self.split.features[self.split.caption_image[torch.as_tensor(indices, dtype=torch.long)]]
        return [(self.split.caption_ids[i], f, i) for i, f in zip(indices, feats)]
