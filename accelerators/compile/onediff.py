"""The `onediff` backend: the UNet compiled by OneDiff (`onediff.infer_compiler.compile`, nexfort or oneflow).

Written against OneDiff's public entry point `onediff.infer_compiler.compile(module, backend=..., options=...)`.
nexfort is a torch.compile backend (our CUDA graphs and warm-restart handling stay in front of it); oneflow
converts the module. Either way the compiled module reads the live parameters, so LoRA patched in place stays
applied. OneDiff compiles modules, not functions, so DeepCache's segments run eager under it (with the reason).
On this workplace nexfort pins torch ≤ 2.5.1 and PyPI's oneflow is a placeholder (HOST.md): the backend greys
out with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..base import AcceleratorSpec, Availability, BackendUnavailable, cuda_available, module_available
from .session import Compiler, apply_backend

NAME = "onediff"
COMPILER_BACKENDS = ("nexfort", "oneflow")


def _real_oneflow() -> bool:
    """PyPI's `oneflow` is an empty placeholder: the real one has a `nn` module."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("oneflow.nn")
    except (ImportError, ValueError):
        return False
    return spec is not None


def compiler_backend() -> str | None:
    if module_available("nexfort"):
        return "nexfort"
    if _real_oneflow():
        return "oneflow"
    return None


def available() -> Availability:
    if not module_available("onediff"):
        return Availability(False, "onediff not installed (pip install onediff, plus nexfort or oneflow)")
    backend = compiler_backend()
    if backend is None:
        return Availability(False, "onediff found, but neither of its compilers (nexfort, oneflow) is installed")
    gpu = cuda_available()
    if not gpu:
        return Availability(False, "needs a CUDA GPU (none visible to torch)")
    return Availability(True, f"onediff ({backend}) on {gpu.reason}")


def onediff_options(backend: str, mode: str, dynamic: str) -> dict:
    """Our options → OneDiff's `compile(..., options=)` for its backend."""
    if backend == "nexfort":
        modes = {"default": "max-optimize:max-autotune:freezing=False",
                 "max-autotune": "max-optimize:max-autotune:low-precision:freezing=False"}
        # no "cudagraphs" in the mode: our own CUDA graphs sit in front of the compiled module
        return {"mode": modes[mode], "memory_format": "channels_last", "dynamic": dynamic == "dynamic"}
    if backend == "oneflow":
        return {"dynamic": dynamic == "dynamic"}
    raise ValueError(f"unknown OneDiff backend {backend!r}; expected one of {', '.join(COMPILER_BACKENDS)}")


class OneDiffCompiler(Compiler):
    name = NAME

    def __init__(self, options, backend: str):
        super().__init__(options)
        self.backend = backend
        self.backend_options = onediff_options(backend, options.mode, options.dynamic)

    def compile_module(self, unet):
        from onediff.infer_compiler import compile as onediff_compile

        self.compile_events.append({"what": f"onediff {self.backend}", "inputs": []})
        return onediff_compile(unet, backend=self.backend, options=self.backend_options)

    def compile_function(self, fn, name):
        raise BackendUnavailable(f"OneDiff compiles modules, not DeepCache's segment {name}")


def apply(model, options: dict | None = None):
    """A clone whose UNet runs compiled by OneDiff, replayed as CUDA graphs."""
    return apply_backend(model, options, NAME, available, lambda parsed: OneDiffCompiler(parsed, compiler_backend()),
                         cuda_graphs=True)


@dataclass
class OneDiffConfig:
    mode: str = "default"        # "max-autotune" adds nexfort's low-precision kernels
    dynamic: str = "buckets"
    fallback: str = "eager"


ACCELERATOR_SPECS = [AcceleratorSpec(
    name=NAME, title="OneDiff",
    description="Compiles the UNet with OneDiff (nexfort or oneflow), replayed as CUDA graphs; LoRA stays live.",
    config=OneDiffConfig, available=available, apply=apply, kind="backend", order=50)]
