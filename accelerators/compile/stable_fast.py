"""The `stable-fast` backend: the UNet traced to TorchScript by stable-fast (`sfast.jit`), replayed as CUDA graphs.

Written against stable-fast's public pieces: `sfast.jit.trace_helper.lazy_trace` (one trace per input
structure), the TorchScript passes in `sfast.jit.passes`, and `CompilationConfig` for the user-facing flags.
Differences from ComfyUI_stable_fast, on purpose:
- no JIT freezing: a frozen graph bakes the weights in as constants, which is why LoRA changes there need a
  re-trace; here the traced graph reads the live parameters, patched in place (see session.py);
- the CUDA graphs are ours (graphs.CapturedCall), so they are freed when ComfyUI unloads the model and
  re-captured only when the weights move;
- a trace bakes the Python of the forward, so one trace per set of patches (FreeU on/off), and calls with
  ControlNet or unknown patches run eager with the reason.
stable-fast publishes no wheel for torch ≥ 2.6 (HOST.md), so on most machines this greys out with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..base import AcceleratorSpec, Availability, cuda_available, module_available
from .session import Compiler, apply_backend
from .stand_in import graph_options, patch_signature

NAME = "stable-fast"


def available() -> Availability:
    found = module_available("sfast", "stable-fast")
    if not found:
        return Availability(False, "stable-fast not installed (pip install stable-fast; no wheel for torch ≥ 2.6 yet)")
    gpu = cuda_available()
    if not gpu:
        return Availability(False, "needs a CUDA GPU (none visible to torch)")
    return Availability(True, f"stable-fast on {gpu.reason}")


def sfast_flags(mode: str, has_xformers: bool, has_triton: bool) -> dict:
    """Our options → stable-fast's CompilationConfig fields (JIT freezing always off: it bakes the weights)."""
    return {"enable_jit": True, "enable_jit_freeze": False, "preserve_parameters": True,
            "enable_cnn_optimization": True, "prefer_lowp_gemm": True, "enable_xformers": has_xformers,
            "enable_triton": has_triton and mode == "max-autotune", "enable_cuda_graph": False,
            "enable_fused_linear_geglu": True}


class StableFastCompiler(Compiler):
    name = NAME
    freezes_python = True

    def __init__(self, options):
        super().__init__(options)
        import importlib.util

        from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig

        self.config = CompilationConfig.Default()
        flags = sfast_flags(options.mode, importlib.util.find_spec("xformers") is not None,
                            importlib.util.find_spec("triton") is not None)
        for field, value in flags.items():
            if hasattr(self.config, field):
                setattr(self.config, field, value)

    def _ts_compiler(self, module, inputs):
        import torch
        from sfast.jit import passes

        with torch.jit.optimized_execution(True):
            graph = module.graph
            if self.config.enable_cnn_optimization and hasattr(passes, "jit_pass_optimize_cnn"):
                passes.jit_pass_optimize_cnn(graph)
            if self.config.prefer_lowp_gemm and hasattr(passes, "jit_pass_prefer_lowp_gemm"):
                passes.jit_pass_prefer_lowp_gemm(graph)
        self.compile_events.append({"what": "trace", "inputs": [tuple(t.shape) for t in inputs[:3]]})
        return module

    def _trace(self, fn):
        from sfast.jit.trace_helper import lazy_trace

        return lazy_trace(fn, ts_compiler=self._ts_compiler, check_trace=False, strict=False)

    def compile_module(self, unet):
        traces: dict = {}

        def run(x, timesteps, context=None, y=None, control=None, transformer_options=None, **kwargs):
            options = transformer_options or {}  # graph-unsafe calls never get here (freezes_python)
            key = patch_signature(options)
            traced = traces.get(key)
            if traced is None:
                frozen_options = graph_options(options)

                def forward(x_, t_, c_, y_=None):
                    return unet(x_, t_, context=c_, y=y_, transformer_options=dict(frozen_options))

                traced = traces[key] = self._trace(forward)
            return traced(x, timesteps, context) if y is None else traced(x, timesteps, context, y)

        return run

    def compile_function(self, fn, name):
        return self._trace(fn)


def apply(model, options: dict | None = None):
    """A clone whose UNet runs as stable-fast's traced TorchScript, replayed as CUDA graphs."""
    return apply_backend(model, options, NAME, available, StableFastCompiler, cuda_graphs=True)


@dataclass
class StableFastConfig:
    mode: str = "default"        # "max-autotune" adds stable-fast's Triton kernels
    dynamic: str = "buckets"
    fallback: str = "eager"


ACCELERATOR_SPECS = [AcceleratorSpec(
    name=NAME, title="Stable Fast",
    description="Traces the UNet to TorchScript with stable-fast's passes and replays it as CUDA graphs; "
                "no JIT freezing, so LoRA stays live.",
    config=StableFastConfig, available=available, apply=apply, kind="backend", order=40)]
