"""Helpers of the artifact-cache tests: a key factory with fixed fields and a runner for worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from accelerators.cache import ArtifactKey  # noqa: E402

VERSIONS = {"torch": "2.11", "triton": "3.5", "cuda": "12.8", "python": "3.12", "comfy_accel": "0.1.0",
            "host": "comfyui 0.3.75"}
DEVICE = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}


def make_key(**overrides) -> ArtifactKey:
    """A key with explicit device and versions (so it does not depend on this machine)."""
    fields = dict(accelerator="inductor", options={"mode": "max-autotune-no-cudagraphs"},
                  model_config={"family": "sd15", "model_channels": 320, "context_dim": 768},
                  weights="s1:" + "ab" * 16, dtype="float16", device=DEVICE, versions=VERSIONS,
                  profile={"batch": [1, 2], "height": [512, 512], "width": [512, 512], "context": [77, 77]})
    fields.update(overrides)
    return ArtifactKey.build(**fields)


def run_worker(*args: str, timeout: float = 60, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Runs tests/cache/workers.py in a fresh interpreter from the repository root."""
    result = subprocess.run([sys.executable, "-m", "tests.cache.workers", *args], cwd=REPO_ROOT, text=True,
                            capture_output=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    if check and result.returncode != 0:
        raise AssertionError(f"worker {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
