"""The `inductor` and `inductor+cudagraphs` backends: torch.compile of the UNet, with our own CUDA graphs.

- `inductor`: `torch.compile` of the whole UNet (or of DeepCache's segments), one static graph per shape
  bucket (or one dynamic graph), through a backend that counts compiles and hands the graph to inductor's
  `compile_fx` (the same path as `backend="inductor"`).
- `inductor+cudagraphs`: the same compiled UNet, captured as one CUDA graph per shape bucket and replayed:
  the UNet call is then one launch instead of hundreds of kernel launches and guard checks. We capture
  ourselves (`graphs.CapturedCall`) instead of using `mode="reduce-overhead"`, so a LoRA change (weights
  copied in place) needs neither a recompile nor a re-record, and the graphs are freed when ComfyUI unloads.

Warm restart, two artifacts in the shared cache, both keyed on the architecture and shape bucket (not the
weights, so one entry serves every checkpoint of the architecture):
- inductor+cudagraphs, plain UNet calls (see `precompile_wanted`): the whole UNet compiled ahead of time by
  dynamo's precompile where torch has it (`precompile.py`), once per bucket instead of the torch.compile
  trace. A new process loads it onto the live weights (read in place, so a LoRA patched in place needs
  nothing) and captures its graph: no dynamo trace, no kernel compile (load times: docs/benchmarks.md). It
  bakes one signature, so calls with patches, DeepCache's segments, and every call where torch has no
  precompile use:
- torch's portable compile-cache artifacts (`torch.compiler.save_cache_artifacts`: inductor's FX-graph,
  AOTAutograd and autotuning caches), loaded before the first compile of a new process: inductor generates
  and autotunes no kernel again, but dynamo still traces the Python.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

from ..base import AcceleratorSpec, Availability, cuda_available
from ..settings import get_settings
from .precompile import FORMAT_VERSION as PRECOMPILE_FORMAT
from .session import Compiler, apply_backend, precision_key

INDUCTOR = "inductor"
INDUCTOR_CUDAGRAPHS = "inductor+cudagraphs"
INDUCTOR_PRECOMPILE = "inductor-precompile"   # cache name of dynamo's precompiled UNets
RECOMPILE_LIMIT = 16   # dynamo's per-function limit: buckets × (batch 1, 2) with room to spare
# inductor settings for the UNet on a GPU: 1×1 convolutions as matmuls (cuBLAS beats cuDNN there). Coordinate-
# descent tuning is left to max-autotune: on full SD1.5 it made the first compile take minutes.
GPU_DEFAULT_CONFIG = {"conv_1x1_as_mm": True}
MODE_CONFIG = {"default": {}, "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True}}


def available() -> Availability:
    try:
        import torch  # noqa: F401
        import torch._inductor  # noqa: F401  (inductor may be stripped from a build)
    except Exception as exc:
        return Availability(False, f"torch.compile unavailable: {exc}")
    gpu = cuda_available()
    if gpu:
        if not _has_module("triton"):
            return Availability(False, "triton not installed (inductor needs it on a GPU)")
        return Availability(True, f"inductor on {gpu.reason}")
    if sys.platform == "win32" and not shutil.which("cl"):
        return Availability(False, "inductor on the CPU needs a C++ compiler (MSVC cl.exe) on PATH")
    compiler = next((c for c in ("cc", "gcc", "clang", "g++", "c++") if shutil.which(c)), None)
    if compiler is None:
        return Availability(False, "inductor on the CPU needs a C/C++ compiler (gcc or clang) on PATH")
    return Availability(True, f"inductor on the CPU ({compiler})")


def available_cudagraphs() -> Availability:
    gpu = cuda_available()
    if not gpu:
        return Availability(False, gpu.reason)
    base = available()
    if not base:
        return base
    return Availability(True, f"inductor + CUDA graphs on {gpu.reason}")


def precompile_wanted() -> bool:
    """Whether inductor+cudagraphs precompiles the plain UNet, so that a new process runs it without dynamo
    tracing the UNet again (the compile-cache artifacts alone leave that trace): where this torch has dynamo's
    precompile (`precompile.py`) and the `precompile` setting is on. Calls with patches (FreeU, attention
    patches) and DeepCache's segments always use torch.compile."""
    from .precompile import available as precompile_available

    return get_settings().precompile and bool(precompile_available())


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class InductorCompiler(Compiler):
    name = INDUCTOR
    artifact_accelerator = INDUCTOR
    carries_extra_inputs = True   # torch.compile takes the call as it is: its graphs carry Flux's guidance and the rest
    warm_compile_threads: int | None = 1   # inductor's compile threads while loading cached kernels (None: its own)

    def __init__(self, options):
        super().__init__(options)
        import torch

        self.config_patches = dict(MODE_CONFIG[options.mode])
        if torch.cuda.is_available():
            self.config_patches = {**GPU_DEFAULT_CONFIG, **self.config_patches}
        # convolution weights channels-last on a GPU (graphs.channels_last_weights); the channels_last setting off
        # keeps the host's layout
        self.channels_last = torch.cuda.is_available() and get_settings().channels_last
        if options.cuda_graphs and options.dynamic != "dynamic":
            # a precompiled UNet bakes the module it traced: the fp8 routing of one call would not reach it
            self.use_precompile(precompile_wanted() and options.precision == "auto")
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        elif limit is None and torch._dynamo.config.cache_size_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.cache_size_limit = RECOMPILE_LIMIT

    def _backend(self, label: str):
        from torch._inductor.compile_fx import compile_fx

        def backend(graph_module, example_inputs):
            shapes = [tuple(t.shape) for t in example_inputs if hasattr(t, "shape")][:4]
            self.compile_events.append({"what": label, "inputs": shapes})
            return compile_fx(graph_module, example_inputs, config_patches=self.config_patches)

        return backend

    def _dynamic(self):
        return {"dynamic": True} if self.options.dynamic == "dynamic" else {"dynamic": False}

    def compile_module(self, unet):
        import torch

        return torch.compile(unet, backend=self._backend("unet"), **self._dynamic())

    def compile_function(self, fn, name):
        import torch

        return torch.compile(fn, backend=self._backend(name), **self._dynamic())

    def artifact_options(self) -> dict:
        return {"mode": self.options.mode, "dynamic": self.options.dynamic,
                "inductor_config": dict(sorted(self.config_patches.items())), **precision_key(self.options)}

    def save_artifacts(self) -> bytes | None:
        import torch

        saved = torch.compiler.save_cache_artifacts()
        return saved[0] if saved else None

    def load_artifacts(self, blob: bytes) -> str:
        import torch

        info = torch.compiler.load_cache_artifacts(blob)
        if info is None:
            return "nothing loaded"
        counts = {name: len(getattr(info, name, []) or []) for name in ("inductor_artifacts", "autotune_artifacts",
                                                                        "aot_autograd_artifacts")}
        return ", ".join(f"{v} {k.replace('_artifacts', '')}" for k, v in counts.items() if v)

    def warm_start(self):
        """Kernels come from the loaded artifacts: load them in this process. With the default thread count
        inductor starts its pool of compile workers for them, and that pool's start-up (a process per core
        importing torch and triton) took the CPU from the sampler for many seconds and slowed the first images
        after a warm start (docs/benchmarks.md). `compile_threads` is not part of inductor's cache key, so this
        changes no hit or miss."""
        import contextlib

        import torch._inductor.config as inductor_config

        if self.warm_compile_threads is None:
            return contextlib.nullcontext()
        return inductor_config.patch(compile_threads=self.warm_compile_threads)

    # -- the whole UNet ahead of time (inductor+cudagraphs, static shape buckets) -----------------------------
    def use_precompile(self, on: bool) -> None:
        """Precompiles the plain UNet of each bucket from now on (or not)."""
        self.package_accelerator = INDUCTOR_PRECOMPILE if on else None
        self.package_format = PRECOMPILE_FORMAT

    def build_package(self, unet, inputs: tuple, transformer_options: dict, folder):
        from .precompile import PrecompiledUNet

        # counted also when the build fails: it was done
        self.compile_events.append({"what": "unet package", "inputs": [tuple(t.shape) for t in inputs]})
        return PrecompiledUNet.build(unet, inputs, transformer_options, folder,
                                     inductor_configs=dict(self.config_patches))

    def load_package(self, folder, unet, transformer_options: dict):
        from .precompile import PrecompiledUNet

        with self.warm_start():   # kernels a CPU build must compile again: in-process (see warm_start)
            return PrecompiledUNet.load(folder, unet, transformer_options)

    def package_files(self, folder) -> dict:
        from .precompile import precompile_files

        return precompile_files(folder)

    def cache_counters(self) -> dict:
        from torch._dynamo.utils import counters

        return {"kernels compiled": counters["inductor"]["fxgraph_cache_miss"],
                "graphs from cache": counters["inductor"]["fxgraph_cache_hit"]}

    def last_recompile_reason(self) -> str:
        from torch._dynamo.utils import guard_failures

        reasons = [r for failures in guard_failures.values() for r in failures]
        if not reasons:
            return ""
        last = reasons[-1]
        return str(getattr(last, "reason", last)).strip().splitlines()[0][:200]


def apply(model, options: dict | None = None):
    """A clone whose UNet runs compiled by inductor (eager with a reason where it cannot)."""
    return apply_backend(model, options, INDUCTOR, available, InductorCompiler, cuda_graphs=False, regional=True)


def apply_cudagraphs(model, options: dict | None = None):
    """A clone whose UNet runs compiled by inductor and replayed as CUDA graphs, one per shape bucket."""
    return apply_backend(model, options, INDUCTOR_CUDAGRAPHS, available_cudagraphs, InductorCompiler,
                         cuda_graphs=True, regional=True)


@dataclass
class CompileConfig:
    mode: str = "default"         # "max-autotune": tuned GEMMs/convolutions, minutes more to compile
    dynamic: str = "buckets"      # buckets | static | dynamic
    fallback: str = "eager"


ACCELERATOR_SPECS = [
    AcceleratorSpec(name=INDUCTOR, title="torch.compile (inductor)",
                    description="Compiles the UNet with inductor, one graph per shape bucket; compiled kernels are "
                                "kept in the artifact cache for a warm restart. LoRA-safe (weights patched in place).",
                    config=CompileConfig, available=available, apply=apply, kind="backend", order=20),
    AcceleratorSpec(name=INDUCTOR_CUDAGRAPHS, title="torch.compile + CUDA graphs",
                    description="The inductor-compiled UNet replayed as one CUDA graph per shape bucket (batch 1 and "
                                "2 for CFG cutoff); a LoRA change needs no recompile or re-capture.",
                    config=CompileConfig, available=available_cudagraphs, apply=apply_cudagraphs, kind="backend",
                    order=10),
]
