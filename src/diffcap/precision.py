"""``auto`` precision: bfloat16 matmuls only where the hardware computes them natively.

bf16 autocast is a large speed-up where the device has bf16 arithmetic (GPUs since Ampere; CPUs with
AVX512/AVX512-BF16/AMX, which oneDNN uses) and a large slow-down where it has not: on an AVX2-only CPU
(AMD EPYC, seen on the diffcap benchmark machines) a bf16 matmul of the denoiser's feed-forward shape ran
at 1.0 GFLOP/s against 163 in fp32, so the proxy's 6-minute teacher budget fitted 26 steps instead of ~1,400
(BENCHMARKS.md, "Session 12"). ``train.mixed_precision=auto`` and ``sampler.precision=auto`` ask for
bf16 where it is fast and full precision elsewhere; explicit ``bf16`` is always honoured.
"""

from __future__ import annotations

import logging

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

log = logging.getLogger(__name__)


def training_device() -> torch.device:
    """The device an ``Accelerator`` in this process trains on, known before it is built (its precision
    is fixed at construction). ``PartialState`` is the process state Accelerator builds on, and the
    first one built is shared by all later ones: it must read ``ACCELERATE_USE_CPU`` as
    ``AcceleratorState`` does, or a multi-process CPU launch initialises as single-process and every
    rank believes it is the main one."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices at least at fp32 speed: a CUDA GPU that supports
    bf16, or a CPU on which oneDNN has bf16 kernels (AVX512 and newer). The check is PyTorch's own
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, which its CPU autocast tests use); there is no
    public one for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def training_precision(mixed_precision: str, device: torch.device | str) -> str:
    """Accelerate's ``mixed_precision`` for ``train.mixed_precision``: ``auto`` becomes bf16 or no."""
    if mixed_precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    if mixed_precision == "bf16" and not native_bf16(device):
        log.warning("train.mixed_precision=bf16 on %s, which has no native bf16 matmuls: expect it to be slow", device)
    return mixed_precision


def sampling_in_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether captioning at ``sampler.precision`` runs its matmuls in bf16 on ``device``."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))
