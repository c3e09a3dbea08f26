"""An in-memory LRU of live compiled objects (compiled modules, TensorRT engines) under a byte budget.

Disk artifacts survive restarts; these are what a process keeps loaded so the next run skips even the
load. A host shim calls `release(key)` / `release_matching(...)` when the host unloads a model, so the
memory (often GPU memory) is freed with it. `on_evict(key, obj)` is called whenever the cache drops an
object — evicted for room, released, or cleared — outside the cache's lock, and its errors are logged.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("comfy_accel.cache")
DEFAULT_LIVE_BUDGET_BYTES = 8 * 10**9
OnEvict = Callable[[Hashable, Any], None]


class LiveObjectCache:
    def __init__(self, budget_bytes: float = DEFAULT_LIVE_BUDGET_BYTES):
        self.budget_bytes = int(budget_bytes)
        self._items: "OrderedDict[Hashable, tuple[Any, int, OnEvict | None]]" = OrderedDict()
        self._lock = threading.RLock()

    def put(self, key: Hashable, obj: Any, nbytes: int, on_evict: OnEvict | None = None) -> list[Hashable]:
        """Keeps `obj` as the most recent entry and evicts the least recently used ones beyond the budget.

        An object larger than the whole budget is still kept (it is in use now) and everything else goes.
        Replacing a key drops the old object (its on_evict runs). Returns the keys that were dropped.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0; got {nbytes}")
        with self._lock:
            dropped = []
            if key in self._items:
                dropped.append((key, *self._items.pop(key)))
            self._items[key] = (obj, int(nbytes), on_evict)
            dropped += self._overflow(keep=key)
        self._notify(dropped)
        return [k for k, *_ in dropped]

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return default
            self._items.move_to_end(key)
            return item[0]

    def release(self, key: Hashable) -> bool:
        """Drops one object (on_evict runs); False if it was not held."""
        with self._lock:
            item = self._items.pop(key, None)
        if item is None:
            return False
        self._notify([(key, *item)])
        return True

    def release_matching(self, predicate: Callable[[Hashable], bool]) -> list[Hashable]:
        """Drops every object whose key satisfies `predicate` (e.g. all engines of one unloaded model)."""
        with self._lock:
            matched = [key for key in self._items if predicate(key)]
            dropped = [(key, *self._items.pop(key)) for key in matched]
        self._notify(dropped)
        return matched

    def clear(self) -> int:
        with self._lock:
            dropped = [(key, *item) for key, item in self._items.items()]
            self._items.clear()
        self._notify(dropped)
        return len(dropped)

    def set_budget(self, budget_bytes: float) -> list[Hashable]:
        """Changes the budget (e.g. from settings) and evicts what no longer fits."""
        with self._lock:
            self.budget_bytes = int(budget_bytes)
            dropped = self._overflow(keep=None)
        self._notify(dropped)
        return [k for k, *_ in dropped]

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size, _ in self._items.values())

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def stats(self) -> dict:
        with self._lock:
            return {"count": len(self._items), "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes}

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _overflow(self, keep: Hashable | None) -> list[tuple]:
        dropped = []
        total = sum(size for _, size, _ in self._items.values())
        for key in list(self._items):
            if total <= self.budget_bytes:
                break
            if key == keep:
                continue
            obj, size, on_evict = self._items.pop(key)
            total -= size
            dropped.append((key, obj, size, on_evict))
        return dropped

    @staticmethod
    def _notify(dropped: list[tuple]) -> None:
        for key, obj, _, on_evict in dropped:
            if on_evict is None:
                continue
            try:
                on_evict(key, obj)
            except Exception:  # a failing cleanup must not leave the cache half-updated or break the caller
                log.exception("comfy-accel: on_evict for %r failed", key)
