"""The store across real processes: a writer killed with SIGKILL mid-write, two processes racing on one key,
a lock held by another process (lock timeout → run eager), and the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accelerators.cache import ArtifactStore
from tests.cache.cache_helpers import REPO_ROOT, make_key
from tests.cache.workers import PAYLOAD

pytestmark = [pytest.mark.slow,   # fresh processes
              pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork-free workers as on POSIX")]


def start_worker(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.cache.workers", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, **popen)


def wait_for_file(path: Path, process: subprocess.Popen, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"worker exited early: {process.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_writer_killed_mid_write_leaves_nothing_visible(tmp_path):
    root, ready = tmp_path / "cache", tmp_path / "ready"
    writer = start_worker("slow-writer", str(root), str(ready))
    wait_for_file(ready, writer)
    staged = list((root / "staging").iterdir())
    assert len(staged) == 1 and (staged[0] / "graph.bin").stat().st_size == len(PAYLOAD) // 2  # truly mid-write
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=10) == -signal.SIGKILL
    store = ArtifactStore(root)  # opening sweeps the dead writer's staging folder
    assert store.get(make_key()) is None and store.entries() == []
    assert not (root / "objects").exists() or list((root / "objects").iterdir()) == []
    assert list((root / "staging").iterdir()) == []
    result = store.get_or_build(make_key(), lambda folder: (folder / "graph.bin").write_bytes(PAYLOAD), lock_timeout=5)
    assert result.built and result.entry.read_bytes("graph.bin") == PAYLOAD  # the dead writer's lock is gone too


def test_two_processes_racing_on_one_key_build_it_once(tmp_path):
    root, count, go = tmp_path / "cache", tmp_path / "builds.txt", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    workers = [start_worker("build", str(root), str(count), str(go), str(flag)) for flag in ready]
    for flag, worker in zip(ready, workers):
        wait_for_file(flag, worker)
    go.touch()  # both are polling for it now: they reach get_or_build within ~10 ms of each other
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert len(count.read_text().splitlines()) == 1  # exactly one build
    built, waited = sorted(outputs, key=lambda o: not o["built"])
    assert built["built"] and built["status"] == "built"
    assert not waited["built"] and waited["reason"] == "built by another process"  # it waited on the lock
    expected = hashlib.sha256(PAYLOAD).hexdigest()
    assert {o["id"] for o in outputs} == {make_key().id} and {o["payload_sha256"] for o in outputs} == {expected}
    assert ArtifactStore(root).get(make_key()).read_bytes("graph.bin") == PAYLOAD


def test_lock_held_by_another_process_times_out_so_the_caller_runs_eager(tmp_path):
    root, ready, key = tmp_path / "cache", tmp_path / "ready", make_key()
    holder = start_worker("hold-lock", str(root), key.id, str(ready), stdin=subprocess.PIPE)
    try:
        wait_for_file(ready, holder)
        calls = []
        started = time.monotonic()
        result = ArtifactStore(root).get_or_build(key, lambda folder: calls.append(folder), lock_timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 5
        entry, built = result
        assert entry is None and not built and result.status == "lock_timeout" and calls == []
        assert result.reason.startswith("lock timeout") and "running eager" in result.reason
    finally:
        holder.communicate(input="", timeout=10)
    assert ArtifactStore(root).get_or_build(key, lambda f: (f / "x.bin").write_bytes(b"1"), lock_timeout=5).built


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accelerators.cache", *args], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=60)


def test_cli_list_remove_clear_stats(tmp_path):
    root = tmp_path / "cache"
    store = ArtifactStore(root)
    keys = [make_key(options={"n": i}) for i in range(3)]
    for key in keys:
        store.put(key, {"graph.bin": PAYLOAD})
    store.flush()
    listed = cli("list", "--root", str(root))
    assert listed.returncode == 0 and listed.stdout.startswith("3 entries")
    assert all(key.id in listed.stdout for key in keys) and "inductor" in listed.stdout
    as_json = json.loads(cli("list", "--root", str(root), "--json").stdout)
    assert {e["id"] for e in as_json["entries"]} == {k.id for k in keys}
    removed = cli("remove", keys[0].id, "--root", str(root))
    assert removed.returncode == 0 and keys[0].id in removed.stdout and not (root / "objects" / keys[0].id).exists()
    invalid = cli("remove", "../x", "--root", str(root))
    assert invalid.returncode == 2 and "invalid artifact id" in invalid.stderr
    missing = cli("remove", keys[0].id, "--root", str(root), "--json")
    assert missing.returncode == 1 and json.loads(missing.stderr)["status"] == 404
    stats = json.loads(cli("stats", "--root", str(root), "--json").stdout)
    assert stats["count"] == 2 and stats["total_bytes"] == 2 * len(PAYLOAD)
    cleared = cli("clear", "--root", str(root))
    assert cleared.returncode == 0 and "removed 2 entries" in cleared.stdout
    assert cli("list", "--root", str(root)).stdout.startswith("0 entries") and ArtifactStore(root).entries() == []


def test_cli_finds_the_store_through_the_environment(tmp_path):
    root = tmp_path / "shared"
    ArtifactStore(root).put(make_key(), {"graph.bin": b"x"})
    listed = subprocess.run([sys.executable, "-m", "accelerators.cache", "list"], cwd=REPO_ROOT, text=True,
                            capture_output=True, timeout=60, env={**os.environ, "COMFY_ACCEL_CACHE": str(root)})
    assert listed.returncode == 0 and make_key().id in listed.stdout and str(root) in listed.stdout
