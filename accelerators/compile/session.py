"""The compile session: one accelerated model's compiled UNet, shared by its clones. What every compile backend
(inductor, inductor+cudagraphs, OneDiff, Stable Fast) shares:

- the options (`parse_options`) and what a backend provides (`Compiler`);
- which shapes run compiled (`admit`: one shape bucket per static graph, or the first only, or one dynamic graph);
- the compiled callables, made once (`compiled_module`, `compiled_function`);
- the first run of a bucket with its progress line, notices and warm-start artifacts (`run_bucket`);
- the fallback: eager with one notice saying why, or an error under the `error` policy.

The stand-in that calls it per UNet call is in `stand_in.py`, the warm-start artifacts in `artifacts.py`, CUDA
graphs and the weights' layout in `graphs.py`, what a whole-call graph carries and captures in `graph_path.py`.

LoRA: the clone updates weights in place (`ModelPatcher.weight_inplace_update`, the host's own switch), so a
LoRA loaded before or after the node changes the very tensors the compiled code and the captured graphs read:
no recompile, no re-capture. When the tensors move anyway (ComfyUI offloaded and reloaded the model, another
clone loaded it the copying way) the graphs are re-captured on the next run, in well under a second.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from .. import events
from ..base import AcceleratorInputError, BackendUnavailable, model_family
from ..options import parse_backend_options, parse_precision, parse_scope
from .artifacts import Artifacts
from .dit import BLOCKS, Served, served_model
from .graphs import ChannelsLastLayout, GraphSet

log = logging.getLogger("comfy_accel")
MAX_BUCKETS = 8   # static graphs of one kind per session under the "buckets" policy


@dataclass
class CompileOptions:
    backend: str
    mode: str = "default"           # default | max-autotune (longer compile, tuned GEMMs/convolutions)
    dynamic: str = "buckets"        # buckets: one static graph per shape, at most MAX_BUCKETS; static: the
    #                                 first shape only; dynamic: one shape-generic graph
    fallback: str = "eager"
    cuda_graphs: bool = False
    node_id: str | None = None
    scope: str = "auto"             # auto: SD UNets whole, DiTs block by block; whole; blocks (dit.py)
    precision: str = "auto"         # auto: the model's dtype; fp8: row-wise fp8 GEMMs (fp8.py)


def parse_options(options: dict | None, backend: str, cuda_graphs: bool = False) -> CompileOptions:
    """Validates the Accelerate Model options (options.py's parsers); raises AcceleratorInputError naming the
    bad value."""
    options = dict(options or {})
    mode, dynamic, fallback = parse_backend_options(options)
    node_id = options.get("node_id")
    scope = parse_scope(options.get("scope"))
    return CompileOptions(backend=backend, mode=mode, dynamic=dynamic, fallback=fallback, cuda_graphs=cuda_graphs,
                          node_id=None if node_id is None else str(node_id), scope=scope,
                          precision=parse_precision(options.get("precision")))


class Compiler:
    """What a backend provides. Subclasses override `compile_module` and `compile_function`; the artifact
    methods are optional (a backend without portable artifacts recompiles in a new process)."""

    name = "compiler"
    artifact_accelerator: str | None = None   # the cache key's accelerator name for warm-restart artifacts
    freezes_python = False   # a tracer (TorchScript) bakes the forward's Python: graph-unsafe calls run eager
    carries_extra_inputs = False   # its graphs take every input of a call (guidance, ...), not only (x, t, context, y)
    channels_last = False    # the UNet's convolution weights are kept channels-last (graphs.channels_last_weights)
    # a backend that precompiles the whole UNet (nothing to trace in a new process) names its cache accelerator
    # here and implements `build_package` / `load_package` / `package_files`
    package_accelerator: str | None = None
    package_kind = "precompiled UNet"   # what notices and the cache's records call one
    package_format = 0                  # the package files' format version, part of their cache key

    def __init__(self, options: CompileOptions):
        self.options = options
        self.compile_events: list[dict] = []   # one per backend compile, appended by the backend

    def compile_module(self, unet) -> Callable:
        raise NotImplementedError

    def compile_function(self, fn: Callable, name: str) -> Callable:
        raise NotImplementedError

    def artifact_options(self) -> dict:
        return {"mode": self.options.mode, "dynamic": self.options.dynamic, **precision_key(self.options)}

    def save_artifacts(self) -> bytes | None:
        return None

    def load_artifacts(self, blob: bytes) -> str:
        return ""

    def cache_counters(self) -> dict:
        return {}

    def last_recompile_reason(self) -> str:
        return ""

    def warm_start(self):
        """Context for a compile whose artifacts were just loaded from the cache (nothing left to generate)."""
        return contextlib.nullcontext()

    def build_package(self, unet, inputs: tuple, transformer_options: dict, folder):
        raise NotImplementedError

    def load_package(self, folder, unet, transformer_options: dict):
        """The stored package in `folder`, for `unet` (bound by the session before use)."""
        raise NotImplementedError

    def package_files(self, folder) -> dict:
        """The built package's files as {name: bytes}, for the artifact store."""
        raise NotImplementedError


def precision_key(options: CompileOptions) -> dict:
    """fp8 code is other code: part of the artifacts' key (absent for the model's dtype, so bf16 keys stay)."""
    return {"precision": options.precision} if options.precision != "auto" else {}


# ---- shape buckets: (batch, latent height, latent width, tokens, y width, dtype, device, frames), or a
# DeepCache segment's (name, that UNet bucket) -----------------------------------------------------------------
def bucket_of(x, context, y) -> tuple:
    """What a static graph is built for (frames: a video model's latent frames, 0 for 4-D latents)."""
    tokens = int(context.shape[1]) if context is not None and context.dim() >= 2 else 0
    return (int(x.shape[0]), int(x.shape[-2]), int(x.shape[-1]), tokens,
            int(y.shape[-1]) if y is not None else 0, str(x.dtype).removeprefix("torch."), str(x.device),
            int(x.shape[2]) if x.dim() == 5 else 0)


def unet_bucket(bucket: tuple) -> tuple:
    return bucket[1] if isinstance(bucket[0], str) else bucket


def bucket_kind(bucket: tuple) -> str:
    return bucket[0] if isinstance(bucket[0], str) else "unet"


def describe_bucket(bucket: tuple) -> str:
    batch, h, w, tokens = unet_bucket(bucket)[:4]
    frames = unet_bucket(bucket)[7] if len(unet_bucket(bucket)) > 7 else 0
    shape = f"batch {batch}, {f'{frames} latent frames of ' if frames else ''}{w * 8}×{h * 8} px, {tokens} tokens"
    return f"{bucket[0]} at {shape}" if isinstance(bucket[0], str) else shape


def bucket_profile(bucket: tuple) -> dict:
    batch, h, w, tokens = unet_bucket(bucket)[:4]
    frames = unet_bucket(bucket)[7] if len(unet_bucket(bucket)) > 7 else 0
    return {"batch": batch, "height": h * 8, "width": w * 8, "tokens": tokens, **({"frames": frames} if frames else {})}


# ---- the session --------------------------------------------------------------------------------------------
@dataclass
class BucketState:
    compiled: bool = False
    failed: str = ""
    seconds: float = 0.0


@dataclass
class CompileSession:
    compiler: Compiler
    options: CompileOptions
    get_store: Callable | None = None
    model_config: dict = field(default_factory=dict)
    served: Served | None = None    # what the lane compiles of this model (None: a UNet, whole)
    device: object = None           # where the model runs (the fp8 copies live there)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        self.lock = threading.RLock()
        self.module_compiled: dict[int, Callable] = {}
        self.functions: dict[tuple, Callable] = {}
        self.buckets: dict[tuple, BucketState] = {}
        self.calls = {"compiled": 0, "graph": 0, "eager": 0, "segments": 0}
        self.artifacts = Artifacts(self)
        self.graphs = GraphSet(self) if self.options.cuda_graphs else None
        self.layout = ChannelsLastLayout(self.notice)
        self.fp8 = None   # fp8.Fp8Weights when the linear layers run in fp8
        if self.options.precision == "fp8":
            from .fp8 import Fp8Weights

            self.fp8 = Fp8Weights(self, self.device if self.device is not None else "cuda")
        # set by the stand-in for each DeepCache call, read by the segment compiler during it
        self.segment_call: tuple = ({}, None, "no graphs")   # (transformer_options, UNet bucket, graph reason)

    @property
    def name(self) -> str:
        return self.options.backend

    bucket_of = staticmethod(bucket_of)

    @property
    def by_blocks(self) -> bool:
        return self.served is not None and self.served.scope == BLOCKS

    def notice(self, message: str, level: str = "warning", once: str | None = None) -> None:
        events.notice(self.name, message, level=level, node_id=self.options.node_id,
                      once_key=None if once is None else f"{self.name}:{self.token}:{once}")

    def fallback(self, reason: str, run_eager: Callable):
        if self.options.fallback == "error":
            raise BackendUnavailable(f"{self.name}: {reason}")
        self.notice(f"{reason}; running eager", once=reason)
        self.calls["eager"] += 1
        return run_eager()

    def admit(self, bucket: tuple) -> str:
        """'' when this bucket may run compiled, else why not (static policy, too many buckets)."""
        if bucket in self.buckets:
            return self.buckets[bucket].failed
        kind = bucket_kind(bucket)
        known = [b for b, state in self.buckets.items() if not state.failed and bucket_kind(b) == kind]
        if self.options.dynamic == "static" and known:
            return (f"{describe_bucket(bucket)} differs from the compiled shape {describe_bucket(known[0])} "
                    f"and the dynamic-shape policy is 'static'")
        if self.options.dynamic == "buckets" and len(known) >= MAX_BUCKETS:
            return (f"{describe_bucket(bucket)} would be shape bucket {len(known) + 1}, over the limit of "
                    f"{MAX_BUCKETS} (use dynamic shapes for many sizes)")
        return ""

    # -- the compiled callables ------------------------------------------------------------------------------
    def compiled_module(self, unet) -> Callable:
        found = self.module_compiled.get(id(unet))   # every compiled call asks: the hit needs no lock, no wait
        if found is not None:
            return found
        self.wait_for_compiler_imports()
        with self.lock:
            found = self.module_compiled.get(id(unet))
            if found is None:
                found = self.module_compiled[id(unet)] = self.compiler.compile_module(unet)
            return found

    def compiled_function(self, name: str, fn: Callable) -> Callable:
        key = (name, id(getattr(fn, "__func__", fn)), id(getattr(fn, "__self__", None)))
        found = self.functions.get(key)
        if found is not None:
            return found
        self.wait_for_compiler_imports()
        with self.lock:
            found = self.functions.get(key)
            if found is None:
                found = self.functions[key] = self.compiler.compile_function(fn, name)
            return found

    def graph_callable(self, unet, bucket: tuple, inputs: tuple, options: dict) -> Callable:
        """What the whole-UNet CUDA graph of a plain call (x, timesteps, context[, y]) captures (graph_path.py)."""
        from .graph_path import graph_callable, graph_inputs

        carried = graph_inputs(*inputs[:3], inputs[3] if len(inputs) > 3 else None, {}, options)
        return graph_callable(self, unet, bucket, carried, options, packaged=self.artifacts.uses_package(options))

    # -- running a bucket ------------------------------------------------------------------------------------
    def run_bucket(self, bucket: tuple, run: Callable, run_eager: Callable, packaged: bool = False,
                   transformer_options: dict | None = None):
        """Runs `run()` for a bucket, with compile progress, diagnostics and artifacts on its first use
        (`packaged`: `run` uses a precompiled UNet, which is its own artifact: no compile-cache artifacts;
        `transformer_options`: the call's, whose patch set keys the artifacts)."""
        state = self.buckets.get(bucket)
        if state is not None and state.compiled:
            before = len(self.compiler.compile_events)
            out = run()
            if len(self.compiler.compile_events) != before:
                self.notice(f"recompiled for {describe_bucket(bucket)}: "
                            f"{self.compiler.last_recompile_reason() or 'a guard failed'}", level="info")
            return out
        state = self.buckets.setdefault(bucket, BucketState())
        self.wait_for_compiler_imports()
        task = self.first_use_task(bucket, packaged)
        events.progress(task, 0, 1, accelerator=self.name, node_id=self.options.node_id)
        started = time.monotonic()
        counters = self.compiler.cache_counters()
        try:
            warm = not packaged and self.artifacts.load_warm(bucket, transformer_options)
            with (self.compiler.warm_start() if warm else contextlib.nullcontext()):
                out = run()
        except Exception as exc:
            state.failed = f"compiling for {describe_bucket(bucket)} failed ({type(exc).__name__}: {exc})"
            log.debug("compile failure", exc_info=True)
            events.progress(task, 1, 1, accelerator=self.name, node_id=self.options.node_id, done=True,
                            message="failed")
            return self.fallback(state.failed, run_eager)
        state.compiled, state.seconds = True, time.monotonic() - started
        after = self.compiler.cache_counters()
        reused = {k: after.get(k, 0) - counters.get(k, 0) for k in after}
        detail = f" ({', '.join(f'{k} {v}' for k, v in reused.items() if v)})" if any(reused.values()) else ""
        events.progress(task, 1, 1, accelerator=self.name, node_id=self.options.node_id, done=True,
                        message=f"{state.seconds:.1f} s{detail}")
        # a warm start from a stored package compiled nothing: say so rather than "compiled"
        done = "ready (loaded from the cache, nothing compiled)" if bucket in self.artifacts.packages_from_cache \
            else "compiled"
        self.notice(f"{done} for {describe_bucket(bucket)} in {state.seconds:.1f} s{detail}", level="info")
        if not packaged or bucket not in self.artifacts.packages:  # a failed package fell back to the module
            self.artifacts.save_warm(bucket, state.seconds, transformer_options)
        return out

    def wait_for_compiler_imports(self) -> None:
        """Nothing compiles or loads while the startup thread imports the compiler (preimport.py)."""
        from . import preimport

        waited = preimport.wait()
        if waited > 0.1:
            self.notice(f"waited {waited:.1f} s for the compiler's modules (imported in the background since "
                        f"startup)", level="info", once="preimport-wait")

    def first_use_task(self, bucket: tuple, packaged: bool) -> str:
        """The progress line of a bucket's first call: a stored package is loaded, not compiled (seconds either
        way, so the toast should not say "compiling" on a warm start)."""
        where = f"({self.name}) for {describe_bucket(bucket)}"
        if packaged and self.artifacts.package_stored(bucket):
            return f"loading the compiled UNet {where} from the cache"
        return f"compiling {f'the {self.served.family} blocks' if self.by_blocks else 'the UNet'} {where}"

    # -- weights ---------------------------------------------------------------------------------------------
    def prepare_layout(self, unet, transformer_options: dict) -> None:
        if self.compiler.channels_last:
            self.layout.prepare(unet, transformer_options)

    def prepare_precision(self, base_model, unet, transformer_options: dict) -> None:
        """fp8: once per sampling run, the routed layers' fp8 copies made or brought up to date (fp8.py); when
        none can run in fp8 this run, one warning says why (the calls run in the model's dtype)."""
        if self.fp8 is None:
            return
        self.fp8.refresh(base_model, unet, transformer_options)
        if self.fp8.why_not:
            events.notice("fp8", f"{self.fp8.why_not}; running in the model's dtype", node_id=self.options.node_id,
                          once_key=f"fp8:{self.token}:{self.fp8.why_not}")

    def release(self) -> None:
        """ComfyUI unloads the model: free the graphs and fp8 copies (compiled code stays; it holds no device
        memory)."""
        if self.graphs is not None:
            self.graphs.unload()
        if self.fp8 is not None:
            self.fp8.release()


# ---- what every backend's apply does ------------------------------------------------------------------------
def store_getter(options: dict):
    """options["get_store"] (a callable) or options["store"] (an ArtifactStore or None) as a callable."""
    if callable(options.get("get_store")):
        return options["get_store"]
    store = options.get("store")
    return (lambda: store) if store is not None else None


def apply_backend(model, options: dict | None, backend: str, available: Callable, make_compiler: Callable,
                  cuda_graphs: bool, regional: bool = False):
    """Validate, check the model (`served_model`: SD UNets whole, DiTs block by block where the backend is
    `regional`), run eager with the reason (or raise under the `error` policy) when the model or the backend
    cannot be served here, else attach a session with its compiler."""
    from .stand_in import attach

    options = dict(options or {})
    parsed = parse_options(options, backend, cuda_graphs=cuda_graphs)
    served = served_model(model, backend, regional, parsed.scope)
    if not served:
        # `asked`: what the caller asked for ("backend 'auto' (picked inductor)"), named in the line
        reason = f"{options['asked']}: {served.reason}" if options.get("asked") else served.reason
        if parsed.fallback == "error" or getattr(getattr(model, "model", None), "diffusion_model", None) is None:
            raise AcceleratorInputError(reason)
        events.notice(backend, f"{reason}; running eager", node_id=parsed.node_id)
        return model.clone()
    ready = available()
    if not ready:
        if parsed.fallback == "error":
            raise BackendUnavailable(f"{backend}: {ready.reason}")
        events.notice(backend, f"{ready.reason}; running eager", node_id=parsed.node_id)
        return model.clone()
    device = getattr(model, "load_device", None)
    if parsed.precision == "fp8":
        from .fp8 import precision_in_effect

        parsed = precision_in_effect(parsed, device, torch_compile=regional)
    session = CompileSession(make_compiler(parsed), parsed, get_store=store_getter(options),
                             model_config=model_config_fields(model), served=served, device=device)
    if served.model_class != "UNetModel":
        events.notice(backend, f"compiles {served.describe()}", level="info", node_id=parsed.node_id)
    return attach(model, session)


def model_config_fields(model) -> dict:
    """The architecture fields of a ComfyUI model for the artifact key (JSON-able)."""
    base = getattr(model, "model", None)
    config = getattr(getattr(base, "model_config", None), "unet_config", None) or {}
    fields = {"family": model_family(model)}
    for key, value in sorted(config.items()):
        if isinstance(value, (int, float, str, bool, list, tuple, type(None))):
            fields[key] = list(value) if isinstance(value, tuple) else value
        else:
            fields[key] = str(value)
    return fields
