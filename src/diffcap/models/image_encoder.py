"""A small CNN image encoder trained jointly with the captioner (the demo has no pretrained encoder).

It turns raw uint8 pixels (B, 3, H, W) into a grid of condition tokens (B, N, C), the same shape a
CLIP patch grid has, so images enter the denoiser through the same conditioning path as features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CNN_IMAGE_SIZE, CNN_WIDTH


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class ConvImageEncoder(nn.Module):
    """Pixels (B, 3, 64, 64) -> tokens (B, 16, width): a 4x4 grid with learned 2-D positions.

    The grid (rather than one pooled vector) keeps where each object is, which the relation words
    ("left of", "above") need; the learned positions tell the denoiser which cell is which.
    """

    def __init__(self, *, width: int = CNN_WIDTH, image_size: int = CNN_IMAGE_SIZE):
        super().__init__()
        self.net = nn.Sequential(
            # stride 2 from the first layer: full-resolution convolutions cost most of a CPU step
            _block(4, 32, 2),
            _block(32, 64, 2),
            _block(64, width, 2),
            _block(width, width, 2),
            nn.Conv2d(width, width, 1),
        )
        grid = image_size // 16
        self.pos = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        self.out_dim = width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        # HSV's value channel, max(R, G, B), as a fourth input: it shows an object's silhouette the same
        # way whatever its colour, so shape filters need not be learned once per colour. Without it the
        # encoder named held-out colour-shape pairs by a seen partner's shape ("green circle" for a green
        # square; BENCHMARKS.md, demo ablations).
        x = torch.cat([x, x.amax(dim=1, keepdim=True)], dim=1)  # (B, 4, H, W)
        x = self.net(x)  # (B, C, 4, 4)
        return x.flatten(2).transpose(1, 2) + self.pos  # (B, 16, C)
