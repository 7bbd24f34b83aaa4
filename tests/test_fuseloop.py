"""The request loop's eager wait (scratchfs.fuseloop): its polling policy and its install.

Whether a mount really takes requests this way, and serves the right bytes doing so, is tested
on real mounts in test_mount_cli.py (test_serial_reader_requests_are_taken_as_they_arrive).
"""

from __future__ import annotations

import types

from scratchfs import fusehook, fuseloop


async def _original_wait() -> bool:
    return True


def test_polling_stops_while_polls_find_nothing_and_probes_now_and_then() -> None:
    w = fuseloop.EagerWait(types.ModuleType("fake"))
    assert all(w._worth_polling() for _ in range(100))  # no poll has failed yet
    for _ in range(10):
        w._polled(False)
    assert w._worth_polling()  # 10 misses in a row: (7/8)**10 = 0.26 of polls still found one
    w._polled(False)
    probes = [w._worth_polling() for _ in range(3 * fuseloop.PROBE_EVERY)]
    assert probes.count(True) == 3 and probes[fuseloop.PROBE_EVERY - 1]
    for _ in range(11):
        w._polled(True)
    assert all(w._worth_polling() for _ in range(100))  # the reader is back


def test_install_swaps_the_wait_and_uninstall_restores_it() -> None:
    fake = types.ModuleType("fake")
    assert not fuseloop.EagerWait(fake).install()  # nothing to replace: left alone
    fake._wait_fuse_readable = _original_wait  # type: ignore[attr-defined]
    w = fuseloop.EagerWait(fake)
    assert fusehook.loaded(), "scratchfs/_fusehook*.so is missing: the package build compiles it"
    assert w.install()
    assert fake._wait_fuse_readable == w.wait  # type: ignore[attr-defined]
    assert fusehook.session_fd() == -1  # no session read through the hook in this process
    w.uninstall()
    assert fake._wait_fuse_readable is _original_wait  # type: ignore[attr-defined]


def test_queued_thread_results_are_counted_without_building_statistics() -> None:
    import trio

    async def main() -> tuple[bool, list[tuple[int, int]]]:
        counter = fuseloop._queued_counter()
        seen = [(counter(), fuseloop._queued_by_statistics())]
        token = trio.lowlevel.current_trio_token()
        token.run_sync_soon(lambda: None)  # as a worker thread delivering its result does
        token.run_sync_soon(lambda: None)
        seen.append((counter(), fuseloop._queued_by_statistics()))
        await trio.lowlevel.checkpoint()  # the loop runs the queued calls
        await trio.lowlevel.checkpoint()
        seen.append((counter(), fuseloop._queued_by_statistics()))
        return counter is not fuseloop._queued_by_statistics, seen

    fast, seen = trio.run(main)
    assert fast, "trio's entry queue was not reachable: the eager wait builds statistics on every request"
    assert seen == [(0, 0), (2, 2), (0, 0)]


def test_no_polling_while_worker_threads_decode() -> None:
    import os
    import select

    import trio

    r, w_fd = os.pipe()  # stands in for /dev/fuse: readable when a request is there
    busy = [True]
    w = fuseloop.EagerWait(types.ModuleType("fake"), spin_us=2000, busy=lambda: busy[0])
    w._original = _original_wait
    w._poller.register(r, select.POLLIN)
    w._fd = r
    polls = [0]
    ready = w._ready

    def counted() -> bool:
        polls[0] += 1
        return ready()

    w._ready = counted  # type: ignore[method-assign]
    try:
        assert trio.run(w.wait)
        assert (polls[0], w.waited, w.taken, w._hit_rate) == (1, 1, 0, 1.0)  # one look, no polling
        busy[0] = False
        assert trio.run(w.wait)
        assert polls[0] > 2 and w.waited == 2 and w._hit_rate < 1.0  # polled its budget, found nothing
        os.write(w_fd, b"x")
        busy[0] = True
        assert trio.run(w.wait)
        assert w.taken == 1 and w.waited == 2  # a request already there is still taken at once
    finally:
        os.close(r)
        os.close(w_fd)
