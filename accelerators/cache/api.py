"""Plain functions over a store that return JSON-able dicts: the HTTP routes and the CLI call these.

`api_remove` raises `InvalidArtifactId` (→ 400) or `ArtifactNotFound` (→ 404); both carry `.status` and
`.as_dict()` so a route can answer with them directly.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from .environment import resolve_cache_root
from .live import LiveObjectCache
from .store import DEFAULT_BUDGET_BYTES, ArtifactStore

_stores: dict[Path, ArtifactStore] = {}
_stores_lock = threading.Lock()
_live: LiveObjectCache | None = None


def live_objects() -> LiveObjectCache:
    """The process-wide cache of live compiled objects (CUDA graphs, engines), within the memory budget of
    the settings; hosts release an unloaded model's objects from it."""
    global _live
    from .. import settings

    budget = int(settings.get_settings().memory_budget_gb * 1e9)
    with _stores_lock:
        if _live is None:
            _live = LiveObjectCache(budget)
        elif _live.budget_bytes != budget:
            _live.set_budget(budget)
        return _live


def default_store(root: str | os.PathLike | None = None, budget_bytes: float | None = None) -> ArtifactStore:
    """The process's one ArtifactStore per folder (default: `resolve_cache_root()`); a given budget updates it.
    Both hosts' shims call this (never `ArtifactStore(...)` themselves), so a process holds one store object."""
    path = Path(root) if root is not None else resolve_cache_root()
    with _stores_lock:
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = ArtifactStore(path, budget_bytes=int(budget_bytes or DEFAULT_BUDGET_BYTES))
        elif budget_bytes is not None:
            store.budget_bytes = int(budget_bytes)
        return store


def api_list(store: ArtifactStore) -> dict:
    entries = [entry.as_dict() for entry in store.entries()]
    return {"root": str(store.root), "count": len(entries), "total_bytes": sum(e["size_bytes"] for e in entries),
            "budget_bytes": store.budget_bytes, "entries": entries}


def api_remove(store: ArtifactStore, artifact_id: str) -> dict:
    store.remove(artifact_id)
    return {"removed": artifact_id}


def api_clear(store: ArtifactStore) -> dict:
    return {"removed": store.clear()}


def api_stats(store: ArtifactStore) -> dict:
    return {**store.stats(), "quarantine": store.quarantined()[:8]}
