"""The micro-batcher: concurrent jobs share one model call; T bounds the wait; one bad item fails alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from worker.batching import MicroBatcher


def _run_concurrently(n: int, target: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * n

    def work(k: int) -> None:
        try:
            results[k] = target(k)
        except Exception as exc:
            results[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_reserved_callers_share_one_call_of_at_most_n() -> None:
    """Six callers that announced themselves, batches of 4: two calls (4 + 2), every result right."""
    calls: list[list[int]] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda xs: (calls.append(list(xs)), [x * 10 for x in xs])[1],
        max_size=4,
        max_wait_s=5.0,
        name="t",
    )
    barrier = threading.Barrier(6)

    def job(k: int) -> int:
        with batcher.reserve() as place:
            barrier.wait()
            time.sleep(0.01 * k)  # arrive one after another
            return place.submit(k)

    start = time.monotonic()
    assert _run_concurrently(6, job) == [0, 10, 20, 30, 40, 50]
    assert sorted(len(c) for c in calls) == [2, 4]
    assert time.monotonic() - start < 2.0  # nobody waited for T: all announced callers came


def test_a_batch_goes_after_t_without_a_caller_that_is_late() -> None:
    """A slow batch-mate (still decoding) does not hold the others beyond T."""
    calls: list[list[int]] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda xs: (calls.append(list(xs)), xs)[1], max_size=8, max_wait_s=0.2, name="t"
    )
    done_at: dict[int, float] = {}
    start = time.monotonic()

    def job(k: int) -> int:
        with batcher.reserve() as place:
            if k == 0:
                time.sleep(1.5)  # the slow job
            result = place.submit(k)
            done_at[k] = time.monotonic() - start
            return result

    assert _run_concurrently(4, job) == [0, 1, 2, 3]
    assert [sorted(c) for c in calls] == [[1, 2, 3], [0]]
    assert max(done_at[k] for k in (1, 2, 3)) < 1.0 < done_at[0]


def test_one_failing_item_fails_only_its_own_caller() -> None:
    """The batch call raises because of item 2: it is retried one by one; only caller 2 fails."""

    def model(xs: list[int]) -> list[int]:
        if 2 in xs:
            raise ValueError("cannot classify item 2")
        return [x + 1 for x in xs]

    batcher: MicroBatcher[int, int] = MicroBatcher(model, max_size=4, max_wait_s=1.0, name="t")
    barrier = threading.Barrier(4)

    def job(k: int) -> int:
        with batcher.reserve() as place:
            barrier.wait()
            return place.submit(k)

    results = _run_concurrently(4, job)
    assert results[0] == 1 and results[1] == 2 and results[3] == 4
    assert isinstance(results[2], ValueError)


def test_a_caller_that_leaves_without_submitting_does_not_hold_the_batch() -> None:
    """A job rejected before the model releases its place; the others go at once, not after T."""
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda xs: xs, max_size=4, max_wait_s=10.0, name="t"
    )
    barrier = threading.Barrier(3)

    def job(k: int) -> int | None:
        with batcher.reserve() as place:
            barrier.wait()
            if k == 0:
                return None  # rejected by validation
            time.sleep(0.05)
            return place.submit(k)

    start = time.monotonic()
    assert _run_concurrently(3, job) == [None, 1, 2]
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("size", [1, 3])
def test_results_are_not_mixed_up_under_load(size: int) -> None:
    """Many callers, small batches: every caller gets its own result."""
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda xs: [x * x for x in xs], max_size=size, max_wait_s=0.01, name="t"
    )
    assert _run_concurrently(24, lambda k: batcher.submit(k)) == [k * k for k in range(24)]


class _ModelAborted(BaseException):
    """Not an Exception: what a KeyboardInterrupt or SystemExit inside the model call looks like."""


def test_a_base_exception_in_the_model_call_strands_no_caller() -> None:
    """The batched call dies with a BaseException: every caller of that batch gets an error at
    once (none waits forever), and the batcher still serves the calls that come after."""
    calls: list[list[int]] = []

    def model(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        if len(calls) == 1:
            raise _ModelAborted("interrupted inside the model")
        return [x + 1 for x in xs]

    batcher: MicroBatcher[int, int] = MicroBatcher(model, max_size=4, max_wait_s=5.0, name="t")
    barrier = threading.Barrier(4)
    outcomes: list[BaseException | int | None] = [None] * 4

    def job(k: int) -> None:
        with batcher.reserve() as place:
            barrier.wait()
            try:
                outcomes[k] = place.submit(k)
            except BaseException as exc:  # the test records what each caller saw
                outcomes[k] = exc

    threads = [threading.Thread(target=job, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads), "a caller is still waiting for its result"
    assert [sorted(c) for c in calls] == [[0, 1, 2, 3]]  # one call, not retried one by one
    # The thread whose turn it was to run the batch gets the BaseException itself; its
    # batch-mates get an ordinary error (their job is retried), not a result.
    assert sum(isinstance(o, _ModelAborted) for o in outcomes) == 1
    mates = [o for o in outcomes if not isinstance(o, _ModelAborted)]
    assert len(mates) == 3
    for mate in mates:
        assert isinstance(mate, RuntimeError) and "_ModelAborted" in str(mate)
        assert isinstance(mate.__cause__, _ModelAborted)

    # Not silently dead: the next caller is served (not left waiting on a stuck batch).
    later: list[int] = []
    caller = threading.Thread(target=lambda: later.append(batcher.submit(10)), daemon=True)
    caller.start()
    caller.join(timeout=5)
    assert later == [11]
