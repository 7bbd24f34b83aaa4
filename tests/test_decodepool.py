"""The decode pool's ordering and shutdown, and the block cache's claimed loads."""

from __future__ import annotations

import threading

import pytest

from scratchfs.decodepool import AHEAD, DEMAND, DecodePool
from scratchfs.squashfs.cache import BlockCache


def test_demand_jobs_run_before_queued_readahead_in_submission_order() -> None:
    pool = DecodePool(1)
    gate = threading.Event()
    ran: list[str] = []
    done = threading.Event()
    try:
        pool.submit(DEMAND, gate.wait)  # holds the only worker while the queue fills
        for i in range(3):
            pool.submit(AHEAD, lambda i=i: ran.append(f"ahead{i}"))
        for i in range(2):
            pool.submit(DEMAND, lambda i=i: ran.append(f"demand{i}"))
        pool.submit(AHEAD, done.set)
        gate.set()
        assert done.wait(10)
    finally:
        pool.close()
    assert ran == ["demand0", "demand1", "ahead0", "ahead1", "ahead2"]


def test_close_cancels_queued_jobs_and_refuses_new_ones() -> None:
    pool = DecodePool(1)
    gate = threading.Event()
    started = threading.Event()
    cancelled: list[int] = []
    ran: list[int] = []

    def block() -> None:
        started.set()
        gate.wait(10)

    pool.submit(DEMAND, block)
    assert started.wait(10)
    for i in range(3):
        pool.submit(AHEAD, lambda i=i: ran.append(i), lambda i=i: cancelled.append(i))
    closer = threading.Thread(target=pool.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert ran == [] and cancelled == [0, 1, 2]
    assert pool.submit(AHEAD, lambda: ran.append(9), lambda: cancelled.append(9)) is False
    assert cancelled == [0, 1, 2, 9] and ran == []


def test_a_failing_job_does_not_kill_its_worker() -> None:
    pool = DecodePool(1)
    done = threading.Event()
    try:
        pool.submit(DEMAND, lambda: 1 / 0)
        pool.submit(DEMAND, done.set)
        assert done.wait(10)
    finally:
        pool.close()


def test_claimed_loads_are_shared_stored_and_failures_reach_waiters() -> None:
    c = BlockCache(1 << 20)
    claim = c.begin_load("a")
    assert claim is not None
    fut, mine = claim
    assert mine
    again = c.begin_load("a")
    assert again is not None and again[0] is fut and again[1] is False  # the same load, not a second
    assert "a" in c and c.get("a") is None
    c.run_load("a", fut, lambda: b"x" * 10)
    assert fut.result() == b"x" * 10 and c.get("a") == b"x" * 10
    assert c.begin_load("a") is None  # cached now

    claim = c.begin_load("b")
    assert claim is not None
    fut, _ = claim
    with pytest.raises(OSError):
        c.run_load("b", fut, lambda: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        fut.result()
    assert "b" not in c  # a failed load leaves nothing claimed: the next reader tries again
    assert c.get_or_load("b", lambda: b"y") == b"y"


def test_busy_while_jobs_are_queued_or_running() -> None:
    from tests.mounts import wait_for

    pool = DecodePool(1)
    gate = threading.Event()
    started = threading.Event()
    try:
        assert not pool.busy()

        def job() -> None:
            started.set()
            gate.wait(10)

        pool.submit(DEMAND, job)
        pool.submit(AHEAD, lambda: 1 / 0)  # a failing job counts as finished too
        assert started.wait(10) and pool.busy()
        gate.set()
        wait_for(lambda: not pool.busy(), "the pool to go idle", timeout=10)
        gate.clear()
        started.clear()
        pool.submit(DEMAND, job)
        assert started.wait(10)
        pool.submit(AHEAD, lambda: None, lambda: None)
        closer = threading.Thread(target=pool.close)
        closer.start()
        gate.set()
        closer.join(10)
        assert not pool.busy()  # the running job finished, the queued one was cancelled
    finally:
        gate.set()
        pool.close()
