"""Captioning speed of a trained pipeline, and what the machine it ran on can do.

Latency is the mean time of single-image calls after one warm-up call (batch-1 serving); throughput is
captions per second of one full-batch call, after a first call of the same batch that warms up and
counts the FLOPs (torch.utils.flop_counter). Both are wall clock on whatever threads torch uses, so
numbers from different machines, or from a loaded one, do not compare.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from ..pipeline import CaptionPipeline


def tile(features: torch.Tensor, n: int) -> torch.Tensor:
    """n rows, repeating the available ones (a small eval set still gives a full batch)."""
    return features[torch.arange(n) % features.shape[0]]


def latency(pipe: CaptionPipeline, features: torch.Tensor, n: int, **sampler) -> tuple[float, float | None]:
    """(mean seconds per caption at batch 1 over the first ``n`` rows, after one warm-up call; mean forwards
    per caption (the model's ``last_nfe``) or None where the model does not count them)."""
    n = min(n, features.shape[0])
    pipe(features[:1], **sampler)
    times, nfes = [], []
    for i in range(n):
        t = time.perf_counter()
        pipe(features[i : i + 1], **sampler)
        times.append(time.perf_counter() - t)
        if hasattr(pipe.model, "last_nfe"):
            nfes.append(pipe.model.last_nfe)
    return sum(times) / n, (sum(nfes) / len(nfes) if nfes else None)


def throughput(pipe: CaptionPipeline, features: torch.Tensor, batch: int, **sampler) -> dict[str, float]:
    """Speed of one ``batch``-caption call: ``captions_per_s``, ``batch_s``, ``gflop_per_caption`` and the
    achieved ``gflops`` (FLOPs counted in a first, warm-up call of the same batch; None with classifier
    guidance, whose autograd.grad the FLOP counter's module hooks refuse)."""
    tiled = tile(features, batch)
    flops = None
    if pipe.sampler_config(**sampler).classifier_scale > 0:
        pipe(tiled, batch_size=batch, **sampler)
    else:
        with FlopCounterMode(display=False) as counter:
            pipe(tiled, batch_size=batch, **sampler)
        flops = counter.get_total_flops()
    t = time.perf_counter()
    pipe(tiled, batch_size=batch, **sampler)
    seconds = time.perf_counter() - t
    return {
        "captions_per_s": batch / seconds,
        "batch_s": seconds,
        "gflop_per_caption": None if flops is None else flops / batch / 1e9,
        "gflops": None if flops is None else flops / seconds / 1e9,
    }


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_s: float = 0.3) -> float:
    """Achieved GFLOP/s of torch.matmul [m x k] @ [k x n] in ``dtype`` (after one warm-up)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    torch.matmul(a, b)
    reps, t = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t) < min_s or reps < 3:
        torch.matmul(a, b)
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
    }
