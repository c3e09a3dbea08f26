"""What the running process contributes to an artifact key (device, library versions) and where the store lives.

torch is imported inside the functions, so listing or clearing the cache (CLI, HTTP routes) stays cheap.
The host's version comes from `set_host_version` (the shims call it) or, for ComfyUI, from its already
imported `comfyui_version` module; nothing here imports a host.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

ENV_CACHE_ROOT = "COMFY_ACCEL_CACHE"
PACK_ROOT = Path(__file__).resolve().parents[2]
_host: str | None = None


def set_host_version(name: str, version: str) -> None:
    """Called by a host shim once at start-up, e.g. ("comfyui", "0.3.75") or ("webui", "v1.10.1")."""
    global _host
    _host = f"{name} {version}".strip()


def host_version() -> str:
    if _host:
        return _host
    comfy = sys.modules.get("comfyui_version")  # only if ComfyUI already imported it
    if comfy is not None and getattr(comfy, "__version__", None):
        return f"comfyui {comfy.__version__}"
    return "none"


@functools.lru_cache(maxsize=1)
def pack_version() -> str:
    """This pack's version from pyproject.toml (the file both hosts install with the pack)."""
    try:
        text = (PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    project = text.split("[project]", 1)[-1].split("\n[", 1)[0]
    found = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    return found.group(1) if found else "unknown"


def _distribution_version(*names: str) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "none"


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict:
    import torch

    return {
        "torch": torch.__version__,
        # read from the installed metadata: importing triton costs seconds and may initialise CUDA
        "triton": _distribution_version("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-windows"),
        "cuda": torch.version.cuda or (f"hip {torch.version.hip}" if getattr(torch.version, "hip", None) else "none"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "comfy_accel": pack_version(),
    }


def runtime_versions() -> dict:
    """torch, triton, CUDA, Python, this pack and the host, as strings ("none" when absent)."""
    return {**_library_versions(), "host": host_version()}


@functools.lru_cache(maxsize=16)
def _describe(kind: str, index: int | None) -> tuple:
    import torch

    if kind == "cuda":
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        fields = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}"}
        arch = getattr(props, "gcnArchName", None)  # ROCm: the ISA is what the code was built for
        if getattr(torch.version, "hip", None) and arch:
            fields["arch"] = arch
        return tuple(fields.items())
    if kind == "cpu":
        return (("type", "cpu"), ("arch", platform.machine() or "unknown"))
    return (("type", kind),)


def describe_device(device) -> dict:
    """A device (torch.device or "cuda:0") as key fields: GPU name and compute capability, or cpu + arch."""
    import torch

    device = torch.device(device)
    return dict(_describe(device.type, device.index))


def current_device() -> dict:
    """The device this process computes on: the current CUDA device if there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return describe_device("cuda")
    return describe_device("cpu")


def environment_fields(device=None) -> dict:
    """{"device": ..., "versions": ...} of this process (device None → the current one)."""
    return {"device": current_device() if device is None else describe_device(device), "versions": runtime_versions()}


def _pack_host_models() -> Path | None:
    """models/ of the host this pack is installed in (ComfyUI custom_nodes/ or WebUI extensions/), if any."""
    parent = PACK_ROOT.parent
    if parent.name in ("custom_nodes", "extensions"):
        return parent.parent / "models"
    return None


def resolve_cache_root(host_default: str | os.PathLike | None = None) -> Path:
    """The store's folder: $COMFY_ACCEL_CACHE if set, else the host's models/accel_cache.

    Without `host_default` (CLI, scripts) the host is guessed from where the pack is installed, and a
    user cache folder is the last resort.
    """
    override = os.environ.get(ENV_CACHE_ROOT, "").strip()
    if override:
        return Path(override).expanduser()
    if host_default:
        return Path(host_default).expanduser()
    models = _pack_host_models()
    if models is not None:
        return models / "accel_cache"
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "comfy_accel" / "accel_cache"
