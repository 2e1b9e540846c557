"""A queue that gathers requests arriving together into one batch for the network.

A diffusion captioner runs the same fixed number of denoising steps for every caption, so a batch of B
costs about one forward pass of B rows per step: far less than B separate calls on a GPU, and less on
a CPU too, where small matrices leave cores idle. Only requests with the same settings (steps, guidance,
seed, ...) can share a call; each batch is formed from the oldest waiting request and the others with
its settings, so no request waits behind a stream of newer ones.

One worker thread runs the batches, one at a time: the network already uses every core, and a second
batch running beside it would only slow both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class Job:
    key: Hashable  # requests with equal keys may share a batch
    item: object
    future: Future = field(default_factory=Future)


class BatchQueue:
    """``run_batch(key, items) -> results`` (one per item) is called on the worker thread with up to
    ``max_batch`` items of one key, after waiting at most ``max_wait_s`` for the batch to fill.
    ``max_batch=1`` turns batching off: every request is its own call."""

    def __init__(
        self,
        run_batch: Callable[[Hashable, list], list],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_s >= 0")
        self.run_batch, self.max_batch, self.max_wait_s, self.max_queue = run_batch, max_batch, max_wait_s, max_queue
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # number of network calls, for /api/health and the load benchmark
        self.items = 0
        self._worker = threading.Thread(target=self._work, name="diffcap-batcher", daemon=True)
        self._worker.start()

    def submit(self, key: Hashable, item: object) -> Future:
        """Queue one request; QueueFull when max_queue requests are already waiting."""
        job = Job(key, item)
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=10)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            key = self._waiting[0].key
            deadline = time.monotonic() + self.max_wait_s
            while not self._closed:
                same = sum(job.key == key for job in self._waiting)
                remaining = deadline - time.monotonic()
                if same >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [job for job in self._waiting if job.key == key][: self.max_batch]
            taken = {id(job) for job in batch}
            self._waiting = [job for job in self._waiting if id(job) not in taken]
        # A request whose client gave up (timeout) was cancelled while waiting: skip it.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                results = self.run_batch(batch[0].key, [job.item for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:
                log.exception("a batch of %d failed", len(batch))
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for job, result in zip(batch, results):
                job.future.set_result(result)
