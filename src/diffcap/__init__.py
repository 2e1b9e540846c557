"""diffcap: image captioning with continuous diffusion language models."""

__version__ = "0.1.0"
