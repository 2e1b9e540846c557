"""A result reused while the tensors it was computed from are unchanged (sampling's hot path)."""

from __future__ import annotations

import torch


def cached_while_unchanged(owner: object, slot: str, sources: tuple[torch.Tensor, ...], compute):
    """``compute()``, reused while none of ``sources`` has changed, when no gradient is being recorded.

    Sampling calls the rounding rows and the score head (gathers of a few thousand rows out of 30,522)
    at every step with the same weights; recomputing them was a quarter of a batch-1 caption's time.
    A tensor's ``_version`` counts its in-place changes (optimizer steps, ``load_state_dict``, EMA
    updates), so it tells when the weights moved. With autograd on, the result must carry this
    forward's graph, so it is never reused then.
    """
    if torch.is_grad_enabled():
        return compute()
    key = tuple((t.data_ptr(), t._version, t.device) for t in sources)
    cached = getattr(owner, slot)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        setattr(owner, slot, cached)
    return cached[1]
