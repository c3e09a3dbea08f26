"""Shared fixtures: the real ComfyUI (in-process and as a server) and random-weight models.

The repository is imported as the package `comfy_accel`, exactly as ComfyUI loads it from custom_nodes/.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ARTIFACTS = REPO_ROOT / "test_artifacts"


@pytest.fixture(scope="session")
def comfy_path():
    from tools.comfy_host import import_comfy

    return import_comfy()


@pytest.fixture(scope="session")
def pack(comfy_path):
    from tools.comfy_host import import_pack

    return import_pack()


@pytest.fixture(scope="session")
def tiny_sd15(comfy_path):
    from tools.model_factory import build_model

    return build_model("tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(comfy_path):
    from tools.model_factory import build_model

    return build_model("tiny-sdxl")


@pytest.fixture(scope="session")
def artifacts_dir():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def comfy_server(comfy_path, tmp_path_factory):
    """One real ComfyUI server with the pack and the small SD1.5 model in models/diffusion_models."""
    from tools.comfy_host import ComfyServer
    from tools.model_factory import build_model, save_unet

    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "accel_test_nodes.py").symlink_to(REPO_ROOT / "tests/host_nodes/accel_test_nodes.py")
    save_unet(build_model("small-sd15"), base / "models" / "diffusion_models" / "accel_small_sd15.safetensors")
    cache = tmp_path_factory.mktemp("accel-cache")
    server = ComfyServer(base_dir=base, env={"COMFY_ACCEL_CACHE": str(cache)})
    server.cache_dir = cache
    server.start()
    yield server
    server.stop()
    if os.environ.get("CI"):
        print(server.log_tail(2000))
