"""Text side of diffcap: caption tokenization."""

from diffcap.text.tokenizer import CaptionTokenizer

__all__ = ["CaptionTokenizer"]
