"""Optional libraries that are not backends of the pack but change what the host runs, with one line each that
a user can act on (printed by `python -m tools.bench --list`, i.e. `./run_demo.sh --list`).

xformers: ComfyUI picks its attention at import (`comfy/ldm/modules/attention.py`: xformers before PyTorch's
SDPA when it loads). On an H200 with torch 2.11+cu130, 0.0.35 loaded with the CUDA 12 runtime wheel beside it
and ComfyUI used it, but SD1.5 sampling was no faster than with SDPA (docs/benchmarks.md, issue 20).
"""
from __future__ import annotations

import importlib.util

XFORMERS_FOR_NEW_TORCH = "xformers>=0.0.35"   # the first release declaring torch>=2.10 instead of one exact torch


def xformers_hint(torch_version: str, cuda_version: str | None) -> str:
    """What installs an xformers that fits this torch."""
    try:
        new_torch = tuple(int(p) for p in torch_version.split(".")[:2]) >= (2, 10)
    except ValueError:
        new_torch = True
    if not new_torch:
        return f"pip install the xformers release built for torch {torch_version} (each one pins a single torch)"
    runtime = " nvidia-cuda-runtime-cu12 (it links the CUDA 12 runtime)" if (cuda_version or "").startswith("13") else ""
    return f'pip install "{XFORMERS_FOR_NEW_TORCH}"{runtime}'


def xformers_status() -> tuple[bool, str]:
    """(usable, one line): whether xformers loads here and what ComfyUI then does with it."""
    import torch

    version = torch.__version__.split("+")[0]
    if importlib.util.find_spec("xformers") is None:
        return False, (f"xformers not installed (optional: ComfyUI's default SDPA attention was as fast on an "
                       f"H200); to try it: {xformers_hint(version, torch.version.cuda)}")
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as exc:
        line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return False, f"xformers is installed but does not load ({line}); {xformers_hint(version, torch.version.cuda)}"
    if not getattr(xformers, "_has_cpp_library", False):
        return False, (f"xformers {xformers.__version__} loads without its CUDA kernels (built for another torch); "
                       f"{xformers_hint(version, torch.version.cuda)}")
    return True, (f"xformers {xformers.__version__}: ComfyUI uses it for attention (start ComfyUI with "
                  f"--disable-xformers for PyTorch's SDPA)")
