"""The store's index: one record per entry (key fields, size, times, hits) kept in memory and in index.json.

Manifests are the truth; the index only spares reading thousands of them. It is reconciled with the
`objects/` folder (new entries read, vanished ones dropped) before every use, and `snapshot(stat=True)` also
re-reads manifests whose modification time changed, so a stale or deleted index.json is harmless.
Writes to index.json are throttled: a lost update costs a manifest read later, nothing else.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .files import read_json, write_json_atomic
from .keys import base_id_of, is_valid_id

log = logging.getLogger("comfy_accel.cache")
INDEX_SCHEMA = 1
FLUSH_INTERVAL_SECONDS = 2.0


def record_from_manifest(manifest: dict, mtime_ns: int) -> dict:
    key = manifest["key"]
    return {"key": key, "base_id": base_id_of(key), "size_bytes": int(manifest["size_bytes"]),
            "created": manifest["created"], "last_used": manifest["last_used"], "hits": int(manifest["hits"]),
            "files": {name: info["size"] for name, info in manifest["files"].items()}, "mtime_ns": mtime_ns}


class Index:
    def __init__(self, path: Path, objects: Path):
        self.path = Path(path)
        self.objects = Path(objects)
        self.records: dict[str, dict] | None = None
        self._dirty = False
        self._last_flush = 0.0
        self._listed_mtime_ns: int | None = None
        self.mutex = threading.RLock()  # the server's HTTP thread lists while the sampler thread writes

    def _load(self) -> dict[str, dict]:
        try:
            data = read_json(self.path)
            if data.get("schema") == INDEX_SCHEMA and isinstance(data.get("records"), dict):
                return data["records"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("comfy-accel cache: index %s unreadable (%s); rebuilding it from the manifests", self.path, exc)
        return {}

    def _read(self, artifact_id: str) -> dict | None:
        manifest_path = self.objects / artifact_id / "manifest.json"
        try:
            mtime_ns = manifest_path.stat().st_mtime_ns
            return record_from_manifest(read_json(manifest_path), mtime_ns)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable manifests are left to lookup(), which quarantines them

    def snapshot(self, stat: bool = False) -> dict[str, dict]:
        """A reconciled copy of the records, safe to iterate while other threads write."""
        with self.mutex:
            return dict(self._sync(stat))

    def _listing_changed(self) -> bool:
        """Whether objects/ may have changed since it was last listed (judged by its mtime, which is trusted
        only once it is a second old: a coarse clock could hide a second change made in the same tick)."""
        try:
            mtime_ns = self.objects.stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = None
        if mtime_ns is not None and mtime_ns == self._listed_mtime_ns:
            return False
        settled = mtime_ns is not None and time.time_ns() - mtime_ns > 1_000_000_000
        self._listed_mtime_ns = mtime_ns if settled else None
        return True

    def _sync(self, stat: bool = False) -> dict[str, dict]:
        """Reconciles with the objects/ folder; `stat` also refreshes records whose manifest changed."""
        if self.records is None:
            self.records = self._load()
            self._dirty = False
        new: list[str] = []
        if self._listing_changed():
            try:
                present = set(os.listdir(self.objects))
            except FileNotFoundError:
                present = set()
            for gone in self.records.keys() - present:
                del self.records[gone]
                self._dirty = True
            new = [name for name in present - self.records.keys() if is_valid_id(name)]
        objects = str(self.objects)  # plain strings: pathlib costs more than the stat itself here
        for artifact_id, record in list(self.records.items()) if stat else ():  # re-read changed manifests only
            try:
                if os.stat(os.path.join(objects, artifact_id, "manifest.json")).st_mtime_ns != record.get("mtime_ns"):
                    new.append(artifact_id)
            except OSError:
                continue
        for artifact_id in new:
            fresh = self._read(artifact_id)
            if fresh is not None:
                self.records[artifact_id] = fresh
                self._dirty = True
            elif self.records.pop(artifact_id, None) is not None:
                self._dirty = True
        return self.records

    def total_bytes(self) -> int:
        with self.mutex:
            return sum(r["size_bytes"] for r in self._sync().values())

    def update(self, artifact_id: str, manifest: dict, mtime_ns: int) -> None:
        with self.mutex:
            if self.records is None:  # not loaded yet: the manifest is the truth, read when first needed
                return
            self.records[artifact_id] = record_from_manifest(manifest, mtime_ns)
            self._dirty = True

    def drop(self, artifact_id: str) -> None:
        with self.mutex:
            if self.records is not None and self.records.pop(artifact_id, None) is not None:
                self._dirty = True

    def reset(self) -> None:
        with self.mutex:
            self.records = {}
            self._dirty = True

    def flush(self, force: bool = False) -> None:
        """Writes index.json if it changed (at most every FLUSH_INTERVAL_SECONDS unless forced)."""
        with self.mutex:
            if self.records is None or not self._dirty:
                return
            now = time.monotonic()
            if (not force and now - self._last_flush < FLUSH_INTERVAL_SECONDS) or not self.path.parent.is_dir():
                return
            try:
                write_json_atomic(self.path, {"schema": INDEX_SCHEMA, "records": self.records}, indent=None)
                self._dirty = False
                self._last_flush = now
            except OSError as exc:  # a read-only or full disk must not break lookups
                log.warning("comfy-accel cache: could not write %s: %s", self.path, exc)
