"""What the store hands back: a `CacheEntry` (one artifact folder and its manifest) and lookup results.

Payloads are read without pickle: raw bytes, JSON, safetensors, or `torch.load(weights_only=True)` where a
torch format cannot be avoided.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .errors import ArtifactNotFound


class CacheEntry:
    """One artifact: `path` (its folder), `manifest` (key fields, files, sizes, times, hits), `files`."""

    def __init__(self, path: Path, manifest: dict):
        self._path: Path | None = Path(path)
        self._store = None  # set on listing entries: verified through it before the first payload read
        self.manifest = manifest

    @classmethod
    def from_record(cls, store, artifact_id: str, record: dict) -> "CacheEntry":
        """A listing entry built from the index: its payloads are checked (`store.get`'s checks) on first read."""
        manifest = {"id": artifact_id, "key": record["key"], "size_bytes": record["size_bytes"],
                    "created": record["created"], "last_used": record["last_used"], "hits": record["hits"],
                    "files": {name: {"size": size} for name, size in record["files"].items()}}
        entry = cls.__new__(cls)
        entry._path, entry._store, entry.manifest = None, store, manifest  # path built on use: listings are big
        return entry

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self._store.objects / self.id
        return self._path

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def key_fields(self) -> dict:
        return self.manifest["key"]

    @property
    def accelerator(self) -> str:
        return self.key_fields.get("accelerator", "?")

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.path / name for name in self.manifest["files"]}

    @property
    def size_bytes(self) -> int:
        return int(self.manifest["size_bytes"])

    @property
    def created(self) -> float:
        return float(self.manifest["created"])

    @property
    def last_used(self) -> float:
        return float(self.manifest["last_used"])

    @property
    def hits(self) -> int:
        return int(self.manifest["hits"])

    @property
    def meta(self) -> dict:
        """What the build function returned (json-able), e.g. build time or engine details."""
        return self.manifest.get("meta") or {}

    def _payload(self, name: str) -> Path:
        if self._store is not None:  # a listing entry: verify (and count the use) before anything is read
            found = self._store.lookup_id(self.id)
            if found.entry is None:
                raise ArtifactNotFound(f"cache entry {self.id[:12]} cannot be read: {found.reason}")
            self._path, self._store, self.manifest = found.entry.path, None, found.entry.manifest
        if name not in self.manifest["files"]:
            raise KeyError(f"cache entry {self.id[:12]} has no payload {name!r} (has {sorted(self.manifest['files'])})")
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        return self._payload(name).read_bytes()

    def read_json(self, name: str):
        return json.loads(self._payload(name).read_text(encoding="utf-8"))

    def load_safetensors(self, name: str, device: str = "cpu") -> dict:
        from safetensors.torch import load_file

        return load_file(str(self._payload(name)), device=device)

    def as_dict(self) -> dict:
        """JSON-able summary for listings (HTTP panel, CLI --json)."""
        key = self.key_fields
        return {"id": self.id, "accelerator": self.accelerator, "profile": key.get("profile", {}),
                "dtype": key.get("dtype"), "device": key.get("device", {}), "versions": key.get("versions", {}),
                "model_config": key.get("model_config", {}), "weights": key.get("weights", ""),
                "options": key.get("options", {}), "size_bytes": self.size_bytes, "created": self.created,
                "last_used": self.last_used, "hits": self.hits,
                "files": {name: info["size"] for name, info in self.manifest["files"].items()}, "key": key}

    def __repr__(self) -> str:
        return f"CacheEntry({self.accelerator}, {self.id[:12]}, {self.size_bytes} bytes)"


class CacheResult(tuple):
    """`entry, built = store.get_or_build(...)`, plus `.status` ("hit", "built", "lock_timeout"),
    `.reason` (one line for logs/notices) and `.miss_reasons` (why an existing entry did not serve)."""

    def __new__(cls, entry: CacheEntry | None, built: bool, status: str, reason: str = "",
                miss_reasons: list[str] | None = None):
        self = super().__new__(cls, (entry, built))
        self.status = status
        self.reason = reason
        self.miss_reasons = list(miss_reasons or [])
        return self

    @property
    def entry(self) -> CacheEntry | None:
        return self[0]

    @property
    def built(self) -> bool:
        return self[1]

    @property
    def ok(self) -> bool:
        return self[0] is not None

    def __repr__(self) -> str:
        return f"CacheResult({self.status}, {self[0]!r}, reason={self.reason!r})"


class Lookup(NamedTuple):
    """`store.lookup(key)`: (entry or None, reason) — reason is "hit", "not cached" or what was wrong."""

    entry: CacheEntry | None
    reason: str
