"""Worker processes for the cache's cross-process tests (run as `python -m tests.cache.workers CMD ...`).

build ROOT COUNT_FILE GO_FILE READY_FILE
                                touch READY_FILE, wait for GO_FILE, then get_or_build the test key; each build
                                appends a line to COUNT_FILE and takes 0.5 s; prints {"status", "built", "reason",
                                "id", "payload_sha256"}
slow-writer ROOT READY_FILE     start building, write half a payload, touch READY_FILE, then sleep (to be killed)
hold-lock ROOT ID READY_FILE    hold the key's build lock until stdin closes
warm-start ROOT                 a compile session's first use of a shape bucket, as in a new process: its
                                artifacts loaded from the store when there (a warm start), else "compiled" and
                                stored; a small blob stands in for torch's compile artifacts (no compile);
                                prints {"id", "notices"}
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from accelerators.cache import ArtifactStore
from accelerators.cache.files import KeyLock
from tests.cache.cache_helpers import make_key

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def _wait_for(path: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.01)


def build(root: str, count_file: str, go_file: str, ready_file: str) -> None:
    store = ArtifactStore(root)

    def build_fn(folder: Path) -> None:
        with open(count_file, "a") as handle:
            handle.write(f"built by {os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other process is surely waiting on the lock
        (folder / "graph.bin").write_bytes(PAYLOAD)

    Path(ready_file).touch()
    _wait_for(Path(go_file))
    result = store.get_or_build(make_key(), build_fn, lock_timeout=30)
    entry = result.entry
    print(json.dumps({"status": result.status, "built": result.built, "reason": result.reason,
                      "id": entry.id if entry else None,
                      "payload_sha256": hashlib.sha256(entry.read_bytes("graph.bin")).hexdigest() if entry else None}))


def slow_writer(root: str, ready_file: str) -> None:
    store = ArtifactStore(root)

    def build_fn(folder: Path) -> None:
        with open(folder / "graph.bin", "wb") as handle:
            handle.write(PAYLOAD[: len(PAYLOAD) // 2])
            handle.flush()
            Path(ready_file).touch()
            time.sleep(60)  # killed here
            handle.write(PAYLOAD[len(PAYLOAD) // 2:])

    store.get_or_build(make_key(), build_fn)


def hold_lock(root: str, artifact_id: str, ready_file: str) -> None:
    lock = KeyLock(Path(root) / "locks" / f"{artifact_id}.lock")
    assert lock.acquire(timeout=10)
    Path(ready_file).touch()
    sys.stdin.read()  # until the test closes our stdin
    lock.release()


def small_artifact_compiler(compiler_class):
    """A compiler of the compile lane (subclass of `compiler_class`) that runs the module as it is and whose
    artifacts are a few bytes: a session's warm-start path, without a compile."""
    class SmallArtifactCompiler(compiler_class):
        artifact_accelerator = "inductor"

        def compile_module(self, unet):
            return unet

        def save_artifacts(self) -> bytes:
            return b"compiled kernels of one shape bucket"

        def load_artifacts(self, blob: bytes) -> str:
            return f"{len(blob)} bytes"

    return SmallArtifactCompiler


def warm_start(root: str) -> None:
    from accelerators import events
    from accelerators.compile.session import Compiler, CompileSession, parse_options

    store = ArtifactStore(root)
    options = parse_options({"fallback": "error", "node_id": "w"}, "inductor")
    session = CompileSession(small_artifact_compiler(Compiler)(options), options, get_store=lambda: store,
                             model_config={"family": "sd15"})
    bucket = (1, 8, 8, 77, 0, "float32", "cpu")
    with events.collect() as raised:
        session.run_bucket(bucket, run=lambda: "ran", run_eager=lambda: "eager")
    print(json.dumps({"id": session.artifacts.artifact_key(bucket).id, "notices": [n["message"] for n in raised]}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"build": build, "slow-writer": slow_writer, "hold-lock": hold_lock, "warm-start": warm_start}[command](*args)
