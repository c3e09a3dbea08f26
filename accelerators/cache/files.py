"""File-system pieces of the store: checksums, atomic JSON writes, the per-key cross-process lock, staging names.

Everything that makes a write crash-safe lives here: files are complete before they are renamed into place,
and a staging folder says which process owns it so a later process can sweep up after a kill -9.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Union

_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_READ_CHUNK = 1 << 20
STALE_STAGING_SECONDS = 24 * 3600


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def check_payload_name(name: str) -> str:
    """A payload's relative path ("graph.bin", "engine/plan.trt"): plain names only, never `..` or absolute."""
    parts = name.split("/")
    if not name or not all(_NAME_PART.fullmatch(part) and part not in (".", "..") for part in parts):
        raise ValueError(f"invalid payload name {name!r}: use letters, digits, '._+-' and '/' between parts")
    return name


PayloadSource = Union[bytes, bytearray, memoryview, str, os.PathLike]  # bytes, or a file to copy


def write_payloads(folder: Path, files: Mapping[str, PayloadSource]) -> None:
    for name, source in files.items():
        target = folder / check_payload_name(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, (bytes, bytearray, memoryview)):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data, fsync: bool = False, indent: int | None = 1) -> None:
    """Writes next to `path` and renames over it: readers see the old or the new file, never half of one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            # dumps, not dump: only the one-shot encoder is the C one (index.json can hold 10,000 records)
            handle.write(json.dumps(data, indent=indent, sort_keys=True, separators=None if indent else (",", ":")))
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def read_json(path: Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def staging_name(artifact_id: str, purpose: str = "build") -> str:
    """<purpose>.<id>.<host>.<pid>.<random>: enough to tell whether the owner is still alive."""
    return f"{purpose}.{artifact_id}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_is_abandoned(path: Path, now: float | None = None) -> bool:
    """True when the process that made this staging folder is gone (same host) or it is a day old."""
    parts = path.name.split(".")
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    if age > STALE_STAGING_SECONDS:
        return True
    if len(parts) != 5 or parts[2] != _HOST or sys.platform == "win32":  # os.kill would terminate on Windows
        return False
    try:
        pid = int(parts[3])
    except ValueError:
        return False
    return pid != os.getpid() and not _pid_alive(pid)


class KeyLock:
    """An exclusive lock on one key across processes (fcntl.flock; msvcrt on Windows), polled until a timeout.

    Lock files are kept: deleting one while another process waits on it would let two builders in.
    """

    POLL_SECONDS = 0.05

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None

    def acquire(self, timeout: float | None = None) -> bool:
        """True once held; False if `timeout` seconds passed (0: try once, None: wait for ever)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if _try_lock(handle):
                self._handle = handle
                return True
            if deadline is not None and time.monotonic() >= deadline:
                handle.close()
                return False
            time.sleep(self.POLL_SECONDS)

    def release(self) -> None:
        if self._handle is not None:
            _unlock(self._handle)
            self._handle.close()
            self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> "KeyLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


if sys.platform == "win32":
    import msvcrt

    def _try_lock(handle) -> bool:
        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(handle) -> bool:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
