"""Integrity of entries: the sizes and sha256 recorded at commit, checked on every load, and the quarantine.

A corrupt or truncated payload is never loaded: the entry is moved (one rename) out of objects/ into
quarantine/ with a quarantine.json that says what failed, and the next build replaces it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .files import check_payload_name, fsync_file, read_json, sha256_file, write_json_atomic
from .keys import ArtifactKey


def payload_table(folder: Path, fsync: bool) -> dict:
    """{relative name: {"size", "sha256"}} of every file a build wrote into `folder` (names checked)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise ValueError(f"cache payload {name} is a symlink; write real files")
        if path.is_dir():
            continue
        if name == "manifest.json":
            raise ValueError("manifest.json is written by the store; name the payload otherwise")
        check_payload_name(name)
        if fsync:
            fsync_file(path)
        files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def verify_entry(path: Path, artifact_id: str) -> tuple[dict | None, str]:
    """(manifest, "") if every payload has its recorded size and sha256, else (manifest or None, the problem)."""
    try:
        manifest = read_json(path / "manifest.json")
        files = manifest["files"]
        if manifest.get("id") != artifact_id or ArtifactKey.from_fields(manifest["key"]).id != artifact_id:
            return manifest, "manifest.json does not match the entry id"
    except FileNotFoundError:
        return None, "manifest.json is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"manifest.json is unreadable ({type(exc).__name__})"
    for name, info in files.items():
        try:
            payload = path / check_payload_name(name)
            size, expected = payload.stat().st_size, int(info["size"])
        except FileNotFoundError:
            return manifest, f"{name} is missing"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return manifest, f"{name}: {exc}"
        if size != expected:
            what = "truncated" if size < expected else "too long"
            return manifest, f"{name} is {what} ({size} of {expected} bytes)"
        if sha256_file(payload) != info.get("sha256"):
            return manifest, f"{name} failed its sha256 check"
    return manifest, ""


def move_to_quarantine(entry: Path, quarantine_dir: Path, reason: str) -> Path:
    """Renames the entry folder into quarantine/<id>.<ns> with a quarantine.json; FileNotFoundError if gone."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / f"{entry.name}.{time.time_ns()}"
    os.rename(entry, target)
    write_json_atomic(target / "quarantine.json", {"id": entry.name, "reason": reason, "when": time.time()})
    return target


def list_quarantined(quarantine_dir: Path) -> list[dict]:
    """{"id", "reason", "when", "path"} per quarantined entry, newest first."""
    found = []
    for folder in quarantine_dir.iterdir() if quarantine_dir.is_dir() else ():
        try:
            found.append({**read_json(folder / "quarantine.json"), "path": str(folder)})
        except (OSError, ValueError, TypeError):
            found.append({"id": folder.name.split(".")[0], "reason": "unknown", "when": 0, "path": str(folder)})
    return sorted(found, key=lambda q: q.get("when", 0), reverse=True)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def trim_quarantine(quarantine_dir: Path, keep: int, max_bytes: int) -> None:
    """Keeps the newest `keep` quarantined entries within `max_bytes`: repeated corruption must not fill the
    disk (the newest one is kept whatever its size, so the latest failure can be looked at)."""
    total = 0
    for rank, old in enumerate(list_quarantined(quarantine_dir)):
        total += _folder_bytes(Path(old["path"]))
        if rank and (rank >= keep or total > max_bytes):
            shutil.rmtree(old["path"], ignore_errors=True)
