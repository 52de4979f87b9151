"""Coalesce queued updates into full train batches, with a bounded wait.

A hub may cut its samples into messages of any size. Training one step per
message makes the device's throughput and its learning dynamics depend on
that choice. ``UpdateBatcher.gather`` takes the updates waiting in the
trainer's queue, and ``Trainer.apply_many`` trains on their samples in steps
of a fixed batch size.

``gather`` takes every update already waiting, up to ``max_batches``
batches of samples. It waits for more only while the samples gathered do
not fill whole batches, and at most ``max_wait_s`` after the first update,
so a lone message whose size is a multiple of the batch size is trained at
once. Each call returns whole updates, so no update is split across two
calls and the daemon can checkpoint between calls.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class HasSamples(Protocol):
    """The part of an update that the batcher reads: its sample count."""

    @property
    def sample_count(self) -> int: ...


Item = TypeVar("Item")
Update = TypeVar("Update", bound=HasSamples)


@dataclass(frozen=True)
class BatchPolicy:
    """Coalescing policy of the trainer.

    Attributes:
        batch_size: samples per train step, at least 1.
        max_wait_s: maximum wait after the first update for samples that
            would complete a batch, in seconds, at least 0.
        max_batches: ``gather`` stops taking updates once they contain
            this many batches of samples.
        max_updates: ``gather`` stops after this many updates, accepted or
            rejected, so a queue of small updates still reaches the
            daemon's checkpoint and acknowledgement between calls.
    """

    batch_size: int = 32
    max_wait_s: float = 0.005
    max_batches: int = 8
    max_updates: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be at least 0, got {self.max_wait_s}")
        if self.max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {self.max_batches}")
        if self.max_updates < 1:
            raise ValueError(f"max_updates must be at least 1, got {self.max_updates}")


class UpdateBatcher(Generic[Item, Update]):
    """Takes queued items until their accepted updates fill whole batches.

    Args:
        policy: batch size and wait bound.
        clock: monotonic clock in seconds, replaceable in tests.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.policy = policy
        self._clock = clock

    def gather(
        self,
        source: queue.Queue[Item],
        accept: Callable[[Item], Update | None],
        timeout: float,
    ) -> list[Update]:
        """Return the accepted updates of one or more queued items.

        Args:
            source: the trainer's queue of received messages.
            accept: turns an item into an update, or returns None when it
                rejected the item. It is called once per item taken, in
                queue order, and must not raise: the items taken before a
                raising call would be lost.
            timeout: maximum wait for the first item, in seconds.

        Returns:
            The accepted updates in queue order; empty when every item taken
            was rejected.

        Raises:
            queue.Empty: no item arrived within ``timeout``.
        """
        batch_size = self.policy.batch_size
        limit = batch_size * self.policy.max_batches
        updates: list[Update] = []
        samples = 0
        taken = 0
        item = source.get(timeout=timeout)
        deadline = self._clock() + self.policy.max_wait_s
        while True:
            update = accept(item)
            taken += 1
            if update is not None:
                updates.append(update)
                samples += update.sample_count
            if samples >= limit or taken >= self.policy.max_updates:
                return updates
            try:
                item = source.get_nowait()
                continue
            except queue.Empty:
                pass
            whole_batches = samples > 0 and samples % batch_size == 0
            remaining = deadline - self._clock()
            if whole_batches or remaining <= 0:
                return updates
            try:
                item = source.get(timeout=remaining)
            except queue.Empty:
                return updates


def batch_slices(sample_count: int, batch_size: int) -> list[slice]:
    """Return the row slices of consecutive train steps of ``batch_size``.

    The last slice is shorter when ``sample_count`` is not a multiple.
    """
    return [
        slice(start, min(start + batch_size, sample_count))
        for start in range(0, sample_count, batch_size)
    ]
