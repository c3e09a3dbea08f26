"""The `stable-fast` backend: the UNet traced to TorchScript by stable-fast (`sfast.jit`), optimised by its
TorchScript passes, and replayed as our CUDA graphs.

Written against stable-fast's pieces: `sfast.jit.trace_helper.lazy_trace` (traces a module, one trace per input
structure), the pass pipeline its UNet compiler applies to a trace (`diffusion_pipeline_compiler.
_build_ts_compiler`, configured by its `CompilationConfig`), and its C++ operators behind those passes.

How the weights get in (checked with torch.jit.trace, which sfast's trace wraps): a function that closes over the
UNet records every weight as a graph constant (and refuses ones that require grad); a module records them as
attributes read at run time (`prim::GetAttr`). We trace a module that owns the UNet, with JIT freezing off
(freezing folds attributes into constants), so the trace reads the live parameters: a LoRA patched in place
(ComfyUI's `weight_inplace_update`, set by stand_in.attach) and weights moved with `.to()` (same Parameter
objects) are seen without a re-trace; the CUDA graphs over them are re-captured when they move (graphs.py).
A parameter *replaced* by a new object is not seen by a trace: the parameter objects are checked before each
trace is used and the traces are redone when they changed.

Differences from ComfyUI_stable_fast, on purpose: no freezing (LoRA stays live), our CUDA graphs (freed when
ComfyUI unloads the model), one trace per shape bucket and set of patches (a trace bakes the forward's Python:
calls with ControlNet or unknown patches run eager with the reason). `mode`: "default" applies its graph passes
and cuDNN convolution fusions (further from eager than inductor's fp16 noise, still lossless in practice);
"max-autotune" adds its fp16-accumulating GEMMs and fused Linear-GEGLU (its docs warn of quality loss; on an
H200 neither faster nor measurably less exact). Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..base import AcceleratorSpec, Availability, BackendUnavailable, cuda_available, module_available
from ..settings import get_settings
from .session import Compiler, apply_backend, bucket_of
from .stand_in import graph_options, patch_signature

NAME = "stable-fast"
# its passes that swap in its own C++/CUDA operators (the rest only rewrite the TorchScript graph)
FUSED_OPERATOR_FLAGS = ("enable_cnn_optimization", "prefer_lowp_gemm", "enable_fused_linear_geglu")
BUILD_HINT = "tools/build_stable_fast.sh --into-env (run from the comfy-accel folder with ComfyUI's python)"


def install_hint(torch_version: str) -> str:
    """What installs stable-fast for this torch: a wheel exists only for torch 2.9 (stable-fast-pruna)."""
    if torch_version.startswith("2.9."):
        return "pip install stable-fast-pruna==1.0.8 (its wheels are built for torch 2.9)"
    return f"no wheel fits torch {torch_version}: build it from source with {BUILD_HINT}"


def library_found() -> bool:
    """Whether the stable-fast package is importable (without importing it): a folder `sfast` holding its
    `jit` package, so that another folder of that name on sys.path (a checkout called sfast) is not taken for it."""
    import importlib.util
    import os

    if not module_available("sfast"):
        return False
    spec = importlib.util.find_spec("sfast")
    return any(os.path.isdir(os.path.join(folder, "jit")) for folder in spec.submodule_search_locations or ())


@functools.lru_cache(maxsize=1)
def _extension_error() -> str:
    """'' when stable-fast's C++ extension loads with this torch, else the first line of the import error."""
    try:
        import sfast._C  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    return ""


def available() -> Availability:
    import torch

    version = torch.__version__.split("+")[0]
    if not library_found():
        return Availability(False, f"stable-fast not installed; {install_hint(version)}")
    gpu = cuda_available()
    if not gpu:
        return Availability(False, "needs a CUDA GPU (none visible to torch)")
    failed = _extension_error()
    if failed:
        return Availability(False, f"stable-fast is installed but its C++ extension does not load with torch "
                                   f"{version} ({failed}); rebuild it: {BUILD_HINT}")
    return Availability(True, f"stable-fast on {gpu.reason}")


def sfast_flags(mode: str) -> dict:
    """Our options → stable-fast's CompilationConfig fields. JIT freezing always off (it bakes the weights in),
    stable-fast's own CUDA graphs off (ours sit in front), its Triton kernels off (written for Triton 2.x)."""
    fast_math = mode == "max-autotune"
    return {"enable_jit": True, "enable_jit_freeze": False, "preserve_parameters": True,
            "enable_cnn_optimization": True, "prefer_lowp_gemm": fast_math, "enable_fused_linear_geglu": fast_math,
            "enable_xformers": False, "enable_triton": False, "enable_cuda_graph": False}


_target_class = None


def _trace_target_class():
    """A module owning the UNet, so that a trace reads its parameters as attributes (not as constants)."""
    global _target_class
    if _target_class is None:
        import torch

        class TraceTarget(torch.nn.Module):
            def __init__(self, unet, transformer_options: dict):
                super().__init__()
                self.unet = unet
                self.transformer_options = transformer_options
                # ComfyUI's UNet is in eval mode: stable-fast's inference-only passes key on this flag (set here
                # alone: train() would recurse into the host's UNet)
                self.training = unet.training

            def forward(self, x, timesteps, context, y=None):
                return self.unet(x, timesteps, context=context, y=y,
                                 transformer_options=dict(self.transformer_options))

        _target_class = TraceTarget
    return _target_class


def parameter_objects(unet) -> tuple:
    """The identity of the UNet's parameter objects (a trace keeps the ones it was made with alive)."""
    return tuple(id(p) for p in unet.parameters())


def reads_live_parameters(traced) -> bool:
    """Whether a trace (lazy_trace's callable, after its first call) reads weights as attributes and holds no
    tensor constants: what makes a LoRA patched in place apply without a re-trace."""
    for module in getattr(traced, "_cached", {}).values():
        graph = str(module.module.graph)
        if "prim::Constant[value=<Tensor>]" in graph or "prim::GetAttr" not in graph:
            return False
    return bool(getattr(traced, "_cached", None))


class StableFastCompiler(Compiler):
    name = NAME
    freezes_python = True

    def __init__(self, options):
        super().__init__(options)
        import torch
        from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig

        self.config = CompilationConfig.Default()
        for field, value in sfast_flags(options.mode).items():
            if hasattr(self.config, field):
                setattr(self.config, field, value)
        if not torch.cuda.is_available():   # its convolution fusions are cuDNN operators
            self.config.enable_cnn_optimization = False
        # its passes give convolutions channels-last inputs on tensor-core GPUs, the weights follow (graphs.py);
        # the channels_last setting off keeps the host's layout for both
        if not get_settings().channels_last:
            self.config.memory_format = None
        self.channels_last = getattr(self.config, "memory_format", None) == torch.channels_last
        self.traces: list = []   # every lazy_trace callable made, for diagnostics and tests

    def _ts_compiler(self):
        from sfast.compilers import diffusion_pipeline_compiler as sfast_compiler

        passes = sfast_compiler._build_ts_compiler(self.config)

        def compile_trace(module, inputs):
            self.compile_events.append({"what": "trace", "inputs": [tuple(t.shape) for t in inputs[:3]]})
            return passes(module, inputs)

        return compile_trace

    def _trace(self, module):
        from sfast.jit.trace_helper import lazy_trace

        traced = lazy_trace(module, ts_compiler=self._ts_compiler(), check_trace=False, strict=False)
        self.traces.append(traced)
        return traced

    def fused_operators(self) -> bool:
        return any(getattr(self.config, f, False) for f in FUSED_OPERATOR_FLAGS)

    def without_fused_operators(self, exc: Exception) -> None:
        """stable-fast's own operators (cuDNN fusions, fp16 GEMMs) failed in this environment: trace again with
        its graph passes only, and say so once."""
        from .. import events
        from .artifacts import exception_line

        for flag in FUSED_OPERATOR_FLAGS:
            setattr(self.config, flag, False)
        reason = exception_line(exc)
        self.compile_events.append({"what": "re-trace without fused operators", "inputs": [], "reason": reason})
        events.notice(NAME, f"stable-fast's fused operators failed here ({reason}); traced again without them",
                      node_id=self.options.node_id)

    def compile_module(self, unet):
        import torch

        traces: dict = {}
        state = {"parameters": None}
        make_target = _trace_target_class()

        def run(x, timesteps, context=None, y=None, control=None, transformer_options=None, **kwargs):
            options = transformer_options or {}  # graph-unsafe calls never get here (freezes_python)
            parameters = parameter_objects(unet)
            if parameters != state["parameters"]:
                if traces:   # a parameter object was replaced: the traces hold the old ones
                    self.compile_events.append({"what": "re-trace (parameters replaced)", "inputs": []})
                traces.clear()
                state["parameters"] = parameters
            key = (patch_signature(options), bucket_of(x, context, y))
            frozen_options = graph_options(options)
            args = (x, timesteps, context) if y is None else (x, timesteps, context, y)
            traced = traces.get(key)
            if traced is None:
                traced = traces[key] = self._trace(make_target(unet, frozen_options))
            try:
                return traced(*args)
            except Exception as exc:
                if not self.fused_operators() or torch.cuda.is_current_stream_capturing():
                    raise
                self.without_fused_operators(exc)
                traces.clear()
                traced = traces[key] = self._trace(make_target(unet, frozen_options))
                return traced(*args)

        return run

    def compile_function(self, fn, name):
        # a segment closes over the UNet (a trace would bake its weights in as constants) and reads the call's
        # transformer_options (a trace would freeze them): DeepCache's segments run eager, with this reason
        # (raised on the first call, where the session turns it into the fallback notice)
        def refuse(*tensors):
            raise BackendUnavailable(f"stable-fast traces the whole UNet, not DeepCache's segment {name}")

        return refuse


def apply(model, options: dict | None = None):
    """A clone whose UNet runs as stable-fast's traced TorchScript, replayed as CUDA graphs."""
    return apply_backend(model, options, NAME, available, StableFastCompiler, cuda_graphs=True)


@dataclass
class StableFastConfig:
    mode: str = "default"        # "max-autotune" adds stable-fast's fp16-accumulating GEMMs (see the docstring)
    dynamic: str = "buckets"
    fallback: str = "eager"


ACCELERATOR_SPECS = [AcceleratorSpec(
    name=NAME, title="Stable Fast",
    description="Traces the UNet to TorchScript with stable-fast's passes and replays it as CUDA graphs; "
                "no JIT freezing, so LoRA stays live.",
    config=StableFastConfig, available=available, apply=apply, kind="backend", order=40)]
