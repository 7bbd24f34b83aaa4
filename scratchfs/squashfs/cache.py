"""A bounded LRU cache of decompressed blocks, shared by every thread reading an image.

Loads are de-duplicated: when a block is being decompressed by one thread (a reader or a
readahead worker), other threads asking for it wait for that result instead of decoding it
again. Capacity is in bytes of block data.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._data: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[Hashable, Future[bytes]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> bytes | None:
        """The cached block or None; a hit refreshes its LRU position."""
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                self.hits += 1
            return data

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data or key in self._loading

    def loading(self, key: Hashable) -> Future[bytes] | None:
        """The future of a load of *key* in progress in another thread, if any."""
        with self._lock:
            return self._loading.get(key)

    def _put_locked(self, key: Hashable, data: bytes) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        if len(data) > self.capacity:
            return
        self._data[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity:
            _, victim = self._data.popitem(last=False)
            self._bytes -= len(victim)

    def put(self, key: Hashable, data: bytes) -> None:
        with self._lock:
            self._put_locked(key, data)

    def discard(self, key: Hashable) -> None:
        """Forget *key* if it is cached (a load of it in progress is not affected)."""
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def begin_load(self, key: Hashable) -> tuple[Future[bytes], bool] | None:
        """Claim the load of *key*: None when it is cached; else (future, mine).

        ``mine`` is True when the caller now owns the load and must end it with
        :meth:`end_load` (in any thread, possibly later); False when another load of *key*
        is already under way (its future is returned).
        """
        got = self._claim(key)
        return got if isinstance(got, tuple) else None

    def end_load(self, key: Hashable, fut: Future[bytes], data: bytes | None, exc: BaseException | None = None) -> None:
        """End a load claimed with :meth:`begin_load`: store *data*, or fail waiters with *exc*."""
        with self._lock:
            if self._loading.get(key) is fut:
                del self._loading[key]
            if exc is None:
                assert data is not None
                self._put_locked(key, data)
        if exc is None:
            fut.set_result(data)  # type: ignore[arg-type]
        else:
            fut.set_exception(exc)

    def run_load(self, key: Hashable, fut: Future[bytes], load: Callable[[], bytes]) -> bytes:
        """Run a load claimed with :meth:`begin_load` and end it."""
        try:
            data = load()
        except BaseException as e:
            self.end_load(key, fut, None, e)
            raise
        self.end_load(key, fut, data)
        return data

    def get_or_load(self, key: Hashable, load: Callable[[], bytes]) -> bytes:
        """Return the block, loading it in this thread unless another thread already is."""
        got = self._claim(key)
        if not isinstance(got, tuple):
            return got
        fut, mine = got
        if not mine:
            return fut.result()  # raises the loader's exception, if any
        return self.run_load(key, fut, load)

    def _claim(self, key: Hashable) -> bytes | tuple[Future[bytes], bool]:
        """The cached block (a hit), else the load's future and whether the caller owns it."""
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                self.hits += 1
                return data
            fut = self._loading.get(key)
            if fut is not None:
                return fut, False
            fut = self._loading[key] = Future()
            self.misses += 1
            return fut, True

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
