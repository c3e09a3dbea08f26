"""The on-disk artifact store shared by every accelerator and both hosts.

Layout under the root (other files there, such as the hosts' settings.json, are left alone):
  objects/<id>/       one folder per artifact: payload files + manifest.json (key, sha256 and size per file,
                      created, last used, hits)
  staging/            builds in progress; renamed into objects/ only when complete, so a kill -9 leaves
                      nothing visible (abandoned folders are swept when a store is opened)
  quarantine/<id>.<t> entries that failed their checksums, with quarantine.json saying why (the newest 8
                      within a tenth of the budget are kept)
  locks/<id>.lock     per-key cross-process build locks
  index.json          a cache of the manifests (see index.py); lookups by key never need it
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .entry import CacheEntry, CacheResult, Lookup
from .errors import ArtifactNotFound, LockTimeout
from .files import (KeyLock, PayloadSource, fsync_dir, read_json, staging_is_abandoned, staging_name,
                    write_json_atomic, write_payloads)
from .index import Index
from .keys import (ArtifactKey, describe_differences, is_valid_id, plain, profile_covers, profile_width,
                   validate_id)
from .integrity import list_quarantined, move_to_quarantine, payload_table, trim_quarantine, verify_entry

log = logging.getLogger("comfy_accel.cache")
DEFAULT_BUDGET_BYTES = 20 * 10**9
MANIFEST_SCHEMA = 1
QUARANTINE_KEEP = 8


class ArtifactStore:
    """Artifacts on disk: lookups verify checksums, writes are atomic and locked per key across processes,
    and the total size is kept within `budget_bytes` (hosts may change it at any time) by LRU eviction."""

    def __init__(self, root: str | os.PathLike, budget_bytes: float = DEFAULT_BUDGET_BYTES, fsync: bool = True):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self.fsync = fsync  # off only for throwaway stores (benchmarks): it guards against power loss, not kill -9
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.quarantine_dir = self.root / "quarantine"
        self.locks = self.root / "locks"
        self._index = Index(self.root / "index.json", self.objects)
        weakref.finalize(self, self._index.flush, True)  # throttled index writes still land at exit
        self._sweep_staging()

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r}, budget_bytes={self.budget_bytes})"

    # ---- lookups -------------------------------------------------------------------------------------
    def lookup(self, key: ArtifactKey, touch: bool = True) -> Lookup:
        """(entry, "hit") after verifying every payload's size and sha256; (None, reason) otherwise.

        A corrupt entry is moved to quarantine/ (and logged) so that the next build replaces it.
        """
        return self._lookup(key.id, touch=touch, have_lock=False)

    def lookup_id(self, artifact_id: str, touch: bool = True) -> Lookup:
        """`lookup` by id (e.g. of a listed entry); InvalidArtifactId for anything but a 64-hex id."""
        return self._lookup(validate_id(artifact_id), touch=touch, have_lock=False)

    def get(self, key: ArtifactKey) -> CacheEntry | None:
        return self._lookup(key.id, touch=True, have_lock=False).entry

    def __contains__(self, key: ArtifactKey) -> bool:
        return (self.objects / key.id / "manifest.json").is_file()

    def get_covering(self, key: ArtifactKey, request: Mapping) -> CacheEntry | None:
        """An entry equal to `key` except for its profile, whose profile covers `request` (tightest first)."""
        records, base_id = self._index.snapshot(), key.base_id
        found = [(profile_width(r["key"]["profile"]), -r["last_used"], artifact_id)
                 for artifact_id, r in records.items()
                 if r["base_id"] == base_id and profile_covers(r["key"]["profile"], request)[0]]
        for _, _, artifact_id in sorted(found):
            entry = self._lookup(artifact_id, touch=True, have_lock=False).entry
            if entry is not None:
                return entry
        return None

    def explain_miss(self, key: ArtifactKey) -> list[str]:
        """Why `key` is not served: the differences to the nearest entry of the same accelerator ([] on a hit)."""
        if key in self:
            return []
        wanted = key.fields
        same = [r for r in self._index.snapshot().values() if r["key"].get("accelerator") == key.accelerator]
        if not same:
            return [f"no {key.accelerator} artifact in the cache yet"]
        # nearest: the same model if there is one, then the fewest differing fields, then the most recent
        same = [r for r in same if r["key"].get("weights") == wanted["weights"]
                and r["key"].get("model_config") == wanted["model_config"]] or same
        nearest = min(same, key=lambda r: (sum(r["key"].get(f) != v for f, v in wanted.items()), -r["last_used"]))
        return describe_differences(nearest["key"], key.fields) or ["an entry with equal fields but another id"]

    def _lookup(self, artifact_id: str, touch: bool, have_lock: bool) -> Lookup:
        path = self.objects / artifact_id
        if not path.is_dir():
            return Lookup(None, "not cached")
        manifest, problem = verify_entry(path, artifact_id)
        if problem:
            nonce = manifest.get("nonce") if manifest else None
            moved = self._quarantine(artifact_id, problem, nonce, have_lock)
            where = "moved to quarantine" if moved else "left for the process that holds its lock"
            return Lookup(None, f"corrupt cache entry {artifact_id[:12]} ({problem}); {where}, it will be rebuilt")
        if touch:
            self._touch(path, manifest)
        return Lookup(CacheEntry(path, manifest), "hit")

    def _touch(self, path: Path, manifest: dict) -> None:
        manifest["last_used"] = time.time()
        manifest["hits"] = int(manifest.get("hits", 0)) + 1
        try:
            write_json_atomic(path / "manifest.json", manifest)
            # in memory only: other processes see the hit through the manifest's new mtime
            self._index.update(path.name, manifest, (path / "manifest.json").stat().st_mtime_ns)
        except OSError as exc:  # removed meanwhile, or a read-only store: the hit itself is still good
            log.debug("comfy-accel cache: could not record a hit on %s: %s", path.name, exc)

    def _quarantine(self, artifact_id: str, reason: str, nonce: str | None, have_lock: bool) -> bool:
        lock = None if have_lock else KeyLock(self._lock_path(artifact_id))
        if lock is not None and not lock.acquire(timeout=0):
            log.warning("comfy-accel cache: entry %s is corrupt (%s); another process holds its lock",
                        artifact_id, reason)
            return False
        try:
            if nonce is not None:  # skip if a fresh entry replaced the one we checked meanwhile
                try:
                    if read_json(self.objects / artifact_id / "manifest.json").get("nonce") != nonce:
                        return False
                except (OSError, ValueError, AttributeError):
                    pass
            target = move_to_quarantine(self.objects / artifact_id, self.quarantine_dir, reason)
            self._index.drop(artifact_id)
            self._index.flush(force=True)
            log.warning("comfy-accel cache: entry %s is corrupt (%s); moved to %s and will be rebuilt",
                        artifact_id, reason, target)
            trim_quarantine(self.quarantine_dir, QUARANTINE_KEEP, self.budget_bytes // 10)
            return True
        except FileNotFoundError:
            return False  # another process moved or removed it first
        finally:
            if lock is not None:
                lock.release()

    def quarantined(self) -> list[dict]:
        """The quarantined entries, newest first: {"id", "reason", "when", "path"}."""
        return list_quarantined(self.quarantine_dir)

    # ---- writes --------------------------------------------------------------------------------------
    def put(self, key: ArtifactKey, files: Mapping[str, PayloadSource], meta: Mapping | None = None,
            lock_timeout: float = 60.0) -> CacheEntry:
        """Stores payloads (bytes, or paths of files to copy) under `key`, replacing an existing entry."""
        lock = KeyLock(self._lock_path(key.id))
        if not lock.acquire(timeout=lock_timeout):
            raise LockTimeout(f"lock timeout: cache key {key.id[:12]} was locked for more than {lock_timeout:g} s")
        try:
            return self._build(key, lambda folder: write_payloads(folder, files), meta)[0]
        finally:
            lock.release()

    def get_or_build(self, key: ArtifactKey, build_fn: Callable[[Path], Mapping | None],
                     lock_timeout: float = 600.0) -> CacheResult:
        """The entry for `key`, building it once across processes if needed.

        `build_fn(folder)` writes the payload files into `folder` (may return a json-able dict kept as
        the manifest's "meta"); its exceptions propagate and leave nothing behind. If another process
        holds the key's lock longer than `lock_timeout`, returns status "lock_timeout" with no entry:
        the caller should run eager.
        """
        first = self._lookup(key.id, touch=True, have_lock=False)
        if first.entry is not None:
            return CacheResult(first.entry, False, "hit", "hit")
        lock = KeyLock(self._lock_path(key.id))
        if not lock.acquire(timeout=lock_timeout):
            return CacheResult(None, False, "lock_timeout",
                               f"lock timeout: another process has been building {key.describe()} for more than "
                               f"{lock_timeout:g} s; running eager")
        try:
            again = self._lookup(key.id, touch=True, have_lock=True)
            if again.entry is not None:
                return CacheResult(again.entry, False, "hit", "built by another process")
            reasons = self.explain_miss(key)
            entry, seconds = self._build(key, build_fn, None)
            why = first.reason if first.reason != "not cached" else "; ".join(reasons)
            return CacheResult(entry, True, "built", f"built in {seconds:.1f} s ({why})", reasons)
        finally:
            lock.release()

    def _build(self, key: ArtifactKey, build_fn: Callable, meta: Mapping | None) -> tuple[CacheEntry, float]:
        """Runs `build_fn` in a staging folder and renames it into place (the caller holds the key's lock)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        folder = self.staging / staging_name(key.id)
        folder.mkdir()
        started = time.monotonic()
        try:
            returned = build_fn(folder)
            seconds = time.monotonic() - started
            meta = {**(returned if isinstance(returned, Mapping) else {}), **(meta or {}), "build_seconds": seconds}
            meta = plain(meta, "meta")  # a clear error now rather than a half-written manifest
            return self._commit(key, folder, meta), seconds
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _commit(self, key: ArtifactKey, folder: Path, meta: Mapping) -> CacheEntry:
        files = payload_table(folder, self.fsync)
        if not files:
            raise ValueError(f"building {key.describe()} wrote no files")
        now = time.time()
        target = self.objects / key.id
        manifest = {"schema": MANIFEST_SCHEMA, "id": key.id, "key": key.fields, "files": files,
                    "size_bytes": sum(f["size"] for f in files.values()), "created": now, "last_used": now,
                    "hits": self._hits_of(target), "nonce": secrets.token_hex(8), "meta": dict(meta)}
        write_json_atomic(folder / "manifest.json", manifest, fsync=self.fsync)
        if self.fsync:
            fsync_dir(folder)
        self.objects.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self._discard(target)
        os.rename(folder, target)  # the moment the entry becomes visible, complete
        if self.fsync:
            fsync_dir(self.objects)
        self._index.update(key.id, manifest, (target / "manifest.json").stat().st_mtime_ns)
        self._index.flush()
        self.evict_to_budget(keep={key.id})
        return CacheEntry(target, manifest)

    @staticmethod
    def _hits_of(path: Path) -> int:
        """The hits of the entry a new build of the same key replaces: they count lookups of the key, and a
        warm start stores its artifacts again (with whatever it compiled on top) right after its hit."""
        try:
            return int(read_json(path / "manifest.json").get("hits", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    # ---- management ----------------------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Every entry (from the index, reconciled with the manifests), most recently used first.

        Listing is cheap; an entry's payloads are verified when first read (a corrupt one raises
        ArtifactNotFound with the reason, after being quarantined)."""
        records = self._index.snapshot(stat=True)
        listed = [CacheEntry.from_record(self, i, r) for i, r in records.items()]
        return sorted(listed, key=lambda e: e.last_used, reverse=True)

    def entry(self, artifact_id: str) -> CacheEntry:
        """The entry with this id (listing form, verified on first read); InvalidArtifactId / ArtifactNotFound."""
        validate_id(artifact_id)
        record = self._index.snapshot().get(artifact_id)
        if record is None:
            raise ArtifactNotFound(f"no cache entry {artifact_id}")
        return CacheEntry.from_record(self, artifact_id, record)

    def remove(self, artifact_id: str) -> None:
        """Deletes one entry; InvalidArtifactId for anything but a 64-hex id, ArtifactNotFound if absent."""
        self._remove(validate_id(artifact_id))
        self._index.flush(force=True)

    def _remove(self, artifact_id: str) -> None:
        try:
            self._discard(self.objects / artifact_id)
        except FileNotFoundError:
            raise ArtifactNotFound(f"no cache entry {artifact_id}") from None
        self._index.drop(artifact_id)

    def clear(self) -> int:
        """Deletes every entry and the quarantine; returns how many entries were removed."""
        removed = 0
        for name in os.listdir(self.objects) if self.objects.is_dir() else []:
            if is_valid_id(name):
                try:
                    self._remove(name)  # one index write at the end, not one per entry
                    removed += 1
                except ArtifactNotFound:
                    continue
        shutil.rmtree(self.quarantine_dir, ignore_errors=True)
        self._index.reset()
        self._index.flush(force=True)
        return removed

    def evict_to_budget(self, keep: Iterable[str] = ()) -> list[str]:
        """Removes least-recently-used entries until the total size fits the budget; returns their ids."""
        keep = set(keep)
        if self._index.total_bytes() <= self.budget_bytes:  # sizes never change after a commit
            return []
        records = self._index.snapshot(stat=True)  # over budget: now last-used times must be current
        total = sum(r["size_bytes"] for r in records.values())
        evicted = []
        for artifact_id, record in sorted(records.items(), key=lambda item: item[1]["last_used"]):
            if total <= self.budget_bytes:
                break
            if artifact_id in keep:
                continue
            try:
                self._remove(artifact_id)
            except ArtifactNotFound:
                pass
            total -= record["size_bytes"]
            evicted.append(artifact_id)
            log.info("comfy-accel cache: evicted %s (%d bytes, last used %s) to stay within %d bytes",
                     artifact_id[:12], record["size_bytes"], time.ctime(record["last_used"]), self.budget_bytes)
        self._index.flush(force=bool(evicted))
        return evicted

    def stats(self) -> dict:
        records = self._index.snapshot(stat=True)
        by_accelerator: dict[str, dict] = {}
        for record in records.values():
            slot = by_accelerator.setdefault(record["key"].get("accelerator", "?"), {"count": 0, "bytes": 0})
            slot["count"] += 1
            slot["bytes"] += record["size_bytes"]
        return {"root": str(self.root), "count": len(records),
                "total_bytes": sum(r["size_bytes"] for r in records.values()), "budget_bytes": self.budget_bytes,
                "hits": sum(r["hits"] for r in records.values()), "quarantined": len(self.quarantined()),
                "by_accelerator": by_accelerator}

    def flush(self) -> None:
        self._index.flush(force=True)

    # ---- helpers -------------------------------------------------------------------------------------
    def _lock_path(self, artifact_id: str) -> Path:
        return self.locks / f"{artifact_id}.lock"

    def _discard(self, path: Path) -> None:
        """Renames a folder out of sight first, then deletes it: readers never see half an entry."""
        self.staging.mkdir(parents=True, exist_ok=True)
        trash = self.staging / staging_name(path.name, "trash")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_staging(self) -> None:
        """Deletes staging folders whose writer died (kill -9, power loss) or that are a day old."""
        if not self.staging.is_dir():
            return
        for folder in self.staging.iterdir():
            if staging_is_abandoned(folder):
                shutil.rmtree(folder, ignore_errors=True)
