"""Fixed-length caption tokenization for a diffusion language model.

A diffusion captioner denoises a whole sequence at once, so every caption
becomes exactly ``max_length`` token ids: the caption's tokens without any
special tokens, truncated, then right-padded with PAD. The model learns to
emit PAD for unused positions; decoding therefore drops PAD (and every other
special token) wherever it occurs, not only at the end.

Two kinds of tokenizer are supported, both wrapped as a Hugging Face
``PreTrainedTokenizerFast`` so they share one code path and one file format:

* ``wordpiece``: a pretrained tokenizer (e.g. BERT's WordPiece vocabulary)
  loaded with ``AutoTokenizer.from_pretrained``;
* ``word_level``: a vocabulary of whole words built from the training
  captions (lower-cased, accents stripped, punctuation split off).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from diffcap.data.contract import DataError, PathLike

Kind = Literal["wordpiece", "word_level"]

CONFIG_NAME = "diffcap_tokenizer.json"
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
# Order fixes the ids: PAD must be 0 so that zero-initialised buffers read as padding.
WORD_LEVEL_SPECIALS = (PAD, UNK, BOS, EOS)
_KINDS = ("wordpiece", "word_level")


def _word_level_normalizer() -> normalizers.Normalizer:
    # StripAccents only removes combining marks, so NFD must split them off first.
    return normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])


def _word_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def _check_texts(captions: Sequence[str]) -> list[str]:
    # A bare string would otherwise be treated as a single caption by HF but
    # as a list of characters by our own loops; refuse the ambiguity.
    if isinstance(captions, str):
        raise TypeError("expected a list of captions, got a single string")
    texts = list(captions)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"caption {i} is a {type(text).__name__}, not a string")
    return texts


class CaptionTokenizer:
    """A Hugging Face fast tokenizer plus the fixed sequence length of the captioner."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_length: int = 20, kind: Kind = "wordpiece"):
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise TypeError(f"expected a fast (Rust-backed) tokenizer, got {type(tokenizer).__name__}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; the captioner needs one")
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if bos is None or eos is None:
            raise ValueError("the tokenizer needs CLS/SEP or BOS/EOS tokens")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self.hf = tokenizer
        self.kind: Kind = kind
        self._max_length = max_length
        self._bos_id = int(bos)
        self._eos_id = int(eos)

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(cls, name_or_path: PathLike, max_length: int = 20) -> CaptionTokenizer:
        """Load a pretrained WordPiece tokenizer from a local folder or a hub id."""
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        return cls(tokenizer, max_length=max_length, kind="wordpiece")

    @classmethod
    def build_word_level(cls, captions: Sequence[str], min_count: int = 1, max_length: int = 20) -> CaptionTokenizer:
        """Build a word-level vocabulary from training captions.

        Words seen fewer than ``min_count`` times are left out and encode as
        [UNK]. Ids are deterministic: the specials [PAD]=0, [UNK], [BOS],
        [EOS], then words by descending count, ties broken alphabetically.
        """
        texts = _check_texts(captions)
        if not texts:
            raise ValueError("cannot build a vocabulary from zero captions")
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        normalizer = _word_level_normalizer()
        pre_tokenizer = _word_level_pre_tokenizer()
        # Counting with the tokenizer's own normalizer and pre-tokenizer keeps
        # the vocabulary exactly consistent with what encode() will look up.
        counts: Counter[str] = Counter()
        for text in texts:
            pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
            counts.update(word for word, _ in pieces)
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        vocab = {token: i for i, token in enumerate([*WORD_LEVEL_SPECIALS, *words])}

        backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
        backend.normalizer = normalizer
        backend.pre_tokenizer = pre_tokenizer
        backend.add_special_tokens(list(WORD_LEVEL_SPECIALS))
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
        )
        return cls(tokenizer, max_length=max_length, kind="word_level")

    # ------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the size an embedding table needs."""
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def bos_id(self) -> int:
        """[CLS] for WordPiece, [BOS] for word level."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """[SEP] for WordPiece, [EOS] for word level."""
        return self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def special_ids(self) -> set[int]:
        return set(self.hf.all_special_ids)

    # ------------------------------------------------------------ encoding

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids of shape ``(N, max_length)``: no special tokens, truncated, right-padded."""
        texts = _check_texts(captions)
        if not texts:
            return torch.empty((0, self.max_length), dtype=torch.long)
        encoded = self.hf(
            texts,
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_attention_mask=False,
            return_tensors="pt",
        )
        return encoded["input_ids"].long()

    def lengths_before_truncation(self, captions: Sequence[str]) -> list[int]:
        """Token count of each caption without truncation, to count captions longer than max_length."""
        texts = _check_texts(captions)
        if not texts:
            return []
        encoded = self.hf(texts, add_special_tokens=False, return_attention_mask=False)
        return [len(ids) for ids in encoded["input_ids"]]

    # ------------------------------------------------------------ decoding

    def _rows(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"expected an integer tensor of shape (N, L), got {ids.dtype} {tuple(ids.shape)}")
            rows = ids.tolist()
        else:
            rows = [[int(i) for i in row] for row in ids]
        size = self.vocab_size
        for r, row in enumerate(rows):
            for i in row:
                if not 0 <= i < size:
                    raise ValueError(f"row {r}: token id {i} is outside the vocabulary [0, {size})")
        return rows

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Caption text per row, with PAD and other special tokens dropped wherever they occur."""
        special = self.special_ids
        rows = [[i for i in row if i not in special] for row in self._rows(ids)]
        texts = self.hf.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [" ".join(text.split()) for text in texts]

    def decode_tokens(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[str]]:
        """Token string at every position, PAD shown as "[PAD]": for displaying denoising steps."""
        return [self.hf.convert_ids_to_tokens(row) for row in self._rows(ids)]

    # ------------------------------------------------------------ persistence

    def save(self, directory: PathLike) -> None:
        """Write the HF tokenizer files plus ``diffcap_tokenizer.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        config = {"max_length": self.max_length, "kind": self.kind}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: PathLike) -> CaptionTokenizer:
        """Restore a tokenizer written by :meth:`save`; the same text gives the same ids."""
        config_path = Path(directory) / CONFIG_NAME
        if not config_path.is_file():
            raise DataError(f"{config_path}: not found; was the tokenizer saved with CaptionTokenizer.save?")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            max_length, kind = config["max_length"], config["kind"]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise DataError(f"{config_path}: expected {{'max_length': int, 'kind': str}} ({exc!r})") from exc
        if kind not in _KINDS or not isinstance(max_length, int):
            raise DataError(f"{config_path}: bad kind {kind!r} or max_length {max_length!r}")
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(tokenizer, max_length=max_length, kind=kind)
