"""Networks: word embeddings with the tied rounding head, the transformer denoiser, image encoders."""
