"""Micro-batching: jobs running side by side in one worker process share batched model calls.

Each job runs in its own thread (Celery's `threads` pool) and does its own fetch, decode,
validation, artifacts and database writes; only the model calls go through a `MicroBatcher`,
which gathers the slices of concurrent jobs into one call of at most `max_size`. A batch runs
as soon as it is full, or as soon as every job that announced itself (`reserve`) has arrived,
or at the latest `max_wait_s` after its first slice arrived. A batch whose call raises is split
into calls of one, so a slice that breaks the model fails only its own job. A call that dies
with a BaseException (an interrupt, SystemExit) is not retried: it goes on in the thread that ran
the batch, and each batch-mate gets `BatchAborted` instead of waiting forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class BatchAborted(RuntimeError):
    """The batched call holding this caller's item died with a BaseException: no result for it."""


@dataclass
class _Slot(Generic[In]):
    item: In
    arrived: float
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class MicroBatcher(Generic[In, Out]):
    """Runs `fn(list of items) -> list of results` on batches gathered from concurrent callers."""

    def __init__(
        self,
        fn: Callable[[list[In]], list[Out]],
        *,
        max_size: int,
        max_wait_s: float,
        name: str,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.fn = fn
        self.max_size = max(1, int(max_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.name = name
        self.on_batch = on_batch
        self._cond = threading.Condition()
        self._pending: list[_Slot[In]] = []
        self._expected = 0  # callers that reserved a place and have not submitted or left
        self._running = False  # one batch in the model at a time; the next one gathers meanwhile

    @contextmanager
    def reserve(self) -> Iterator[Reservation[In, Out]]:
        """Announce a caller that will probably submit one item, so a batch can go as soon as
        every announced caller is in it instead of waiting T; leaving without submitting is fine."""
        reservation: Reservation[In, Out] = Reservation(self)
        with self._cond:
            self._expected += 1
        try:
            yield reservation
        finally:
            if not reservation.used:
                with self._cond:
                    self._expected -= 1
                    self._cond.notify_all()

    def submit(self, item: In, *, reservation: Reservation[In, Out] | None = None) -> Out:
        """Add one item to the next batch and block until its result (or its own error) is back."""
        slot: _Slot[In] = _Slot(item, time.monotonic())
        with self._cond:
            if reservation is not None and not reservation.used:
                reservation.used = True
                self._expected -= 1
            self._pending.append(slot)
            self._cond.notify_all()
            while not slot.done:
                batch = self._take_if_ready()
                if batch is not None:
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                        self._running = False
                        self._cond.notify_all()
                    continue
                self._cond.wait(timeout=self._time_left())
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[no-any-return]

    def _time_left(self) -> float | None:
        """How long a waiting caller sleeps: until the oldest slot's deadline, or a notify."""
        if self._running or not self._pending:
            return None
        return max(0.0, self._pending[0].arrived + self.max_wait_s - time.monotonic()) + 1e-4

    def _take_if_ready(self) -> list[_Slot[In]] | None:
        """The next batch if it may run now (called with the lock held)."""
        if self._running or not self._pending:
            return None
        full = len(self._pending) >= self.max_size
        nobody_else = self._expected <= 0  # every announced caller has submitted
        expired = time.monotonic() >= self._pending[0].arrived + self.max_wait_s
        if not (full or nobody_else or expired):
            return None
        batch, self._pending = self._pending[: self.max_size], self._pending[self.max_size :]
        self._running = True
        return batch

    def _run(self, batch: list[_Slot[In]]) -> None:
        """Call fn on the batch and hand every slot its result or error; re-raises a BaseException
        (interrupt, SystemExit) after failing the whole batch with BatchAborted."""
        start = time.perf_counter()
        try:
            outcomes = self._outcomes(batch)
        except BaseException as exc:
            self._abort(batch, exc)
            raise
        elapsed = time.perf_counter() - start
        if self.on_batch is not None:
            try:
                self.on_batch(self.name, len(batch), elapsed)
            except Exception:  # metrics must never strand the batch's waiting callers
                log.exception("%s: recording a batch failed", self.name)
        with self._cond:
            for slot, (result, error) in zip(batch, outcomes, strict=True):
                slot.result, slot.error, slot.done = result, error, True
            self._cond.notify_all()

    def _outcomes(self, batch: list[_Slot[In]]) -> list[tuple[Any, BaseException | None]]:
        """(result, error) per slot; on an error, retry each item alone so only its culprit fails."""
        try:
            results = self.fn([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            return [(r, None) for r in results]
        except Exception:
            if len(batch) > 1:
                log.warning("%s: a batch of %d failed; retrying one by one", self.name, len(batch))
            return [self._run_one(s.item) for s in batch]

    def _abort(self, batch: list[_Slot[In]], exc: BaseException) -> None:
        """Fail every slot of a batch whose call died with `exc`, so no batch-mate waits forever."""
        log.error("%s: a batch of %d was aborted by %r", self.name, len(batch), exc)
        with self._cond:
            for slot in batch:
                if not slot.done:
                    error = BatchAborted(
                        f"{self.name}: the batched model call was aborted by {type(exc).__name__}"
                    )
                    error.__cause__ = exc
                    slot.error, slot.done = error, True
            self._cond.notify_all()

    def _run_one(self, item: In) -> tuple[Any, BaseException | None]:
        try:
            (result,) = self.fn([item])
            return result, None
        except Exception as exc:
            return None, exc


class Reservation(Generic[In, Out]):
    """A caller's announced place in a batcher; `submit` uses it."""

    def __init__(self, batcher: MicroBatcher[In, Out]) -> None:
        self.batcher = batcher
        self.used = False

    def submit(self, item: In) -> Out:
        """Submit this caller's item (see MicroBatcher.submit)."""
        return self.batcher.submit(item, reservation=self)
