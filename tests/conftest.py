"""Shared fixtures: the real ComfyUI (in-process and as a server) and random-weight models.

The repository is imported as the package `comfy_accel`, exactly as ComfyUI loads it from custom_nodes/.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# `tests` is ours before ComfyUI's root joins sys.path: this folder is a namespace package (no __init__.py), and
# a regular package of the same name anywhere on sys.path (ComfyUI has one) wins every later `import tests...`
import tests  # noqa: E402

assert REPO_ROOT / "tests" in {Path(p).resolve() for p in tests.__path__}, \
    f"`tests` is not this repository's: {tests.__path__}"

ARTIFACTS = REPO_ROOT / "test_artifacts"
SERVER_FIXTURES = {"comfy_server", "server"}   # a real ComfyUI process (tests/web's fixture is named `server`)
_inductor_cache: str | None = None


def pytest_configure(config):
    """One inductor cache per pytest run, shared by this process and every fresh process a test starts (they
    inherit the variable): a kernel compiled once in the run is not compiled again, and nothing is left from
    an earlier run. Tests that need an empty cache of their own still set TORCHINDUCTOR_CACHE_DIR themselves."""
    global _inductor_cache
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        _inductor_cache = tempfile.mkdtemp(prefix="comfy-accel-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache


def pytest_unconfigure(config):
    if _inductor_cache:
        shutil.rmtree(_inductor_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Server and browser tests are slow (a ComfyUI process, Chromium): `-m "not slow"` leaves them out.
    Compile and fresh-process tests carry the mark themselves."""
    for item in items:
        if item.get_closest_marker("browser") or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
