"""Running the UNet through a compiled callable inside ComfyUI's official hooks: what every compile backend
(inductor, inductor+cudagraphs, OneDiff, Stable Fast) shares.

`attach(model, session)` clones the ModelPatcher and adds one `APPLY_MODEL` wrapper (key
`comfy_accel.compile`) that swaps the BaseModel's `diffusion_model` for a `CompiledUNet` stand-in for the
duration of one `apply_model` call (the pattern of ComfyUI's own torch.compile helper: never a lasting object
patch, so LoRA loaders keep matching keys). The stand-in decides per call:

- DeepCache wraps the UNet → the real UNet runs (DeepCache's block loop stays Python) and DeepCache's three
  segments go through this session's segment compiler (`segments.py`): each compiled, and graph-captured,
  once per shape;
- another `DIFFUSION_MODEL` wrapper, a backend that failed, a shape the dynamic-shape policy refuses → eager,
  with one notice saying why (or an error under the `error` fallback policy);
- otherwise the compiled UNet, and with CUDA graphs a replay of the graph captured for this shape bucket.

LoRA: the clone updates weights in place (`ModelPatcher.weight_inplace_update`, the host's own switch), so
a LoRA loaded before or after the node changes the very tensors the compiled code and the captured graphs
read: no recompile, no re-capture. When the tensors move anyway (ComfyUI offloaded and reloaded the model,
another clone loaded it the copying way) the graphs are re-captured on the next run, in well under a second.

Compiled artifacts go to the shared artifact cache after the first compile of a shape bucket and are loaded
before the first compile in a new process (`Compiler.save_artifacts` / `load_artifacts`).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import events
from .base import AcceleratorInputError, BackendUnavailable, model_family
from .compiled_dit import BLOCKS, SCOPES, Served, block_function, blocks_compiled, served_model
from .cuda_graphs import GraphSet
from .segments import COMPILER_KEY

log = logging.getLogger("comfy_accel")
WRAPPER_KEY = "comfy_accel.compile"
DEEPCACHE_WRAPPER_KEY = "comfy_accel.deepcache"
FALLBACKS = ("eager", "error")
DYNAMIC = ("buckets", "static", "dynamic")
MODES = ("default", "max-autotune")
MAX_BUCKETS = 8
UNUSABLE_PACKAGE = "unet-package-unusable"   # key part of the record that a package failed to load here
UNUSABLE_REASON_FILE = "reason.txt"
PACKAGE_PROBE = "package-probe"   # key part of the record whether a small package loads in this environment
PROBE_OUTCOME_FILE = "outcome.json"
# patches whose functions depend only on the tensors they are given (no per-step Python state), so a CUDA
# graph captured with them replays them faithfully. Others run compiled, without a graph.
GRAPH_SAFE_PATCH_MODULES = ("comfy_extras.nodes_freelunch",)


@dataclass
class CompileOptions:
    backend: str
    mode: str = "default"           # default | max-autotune (longer compile, tuned GEMMs/convolutions)
    dynamic: str = "buckets"        # buckets: one static graph per shape, at most MAX_BUCKETS; static: the
    #                                 first shape only; dynamic: one shape-generic graph
    fallback: str = "eager"
    cuda_graphs: bool = False
    node_id: str | None = None
    max_buckets: int = MAX_BUCKETS
    scope: str = "auto"             # auto: SD UNets whole, DiTs block by block; whole; blocks (compiled_dit.py)


def fallback_and_dynamic(options: dict) -> tuple[str, str]:
    """The two options every backend of Accelerate Model shares (TensorRT too), validated."""
    fallback = options.get("fallback") or "eager"
    if fallback not in FALLBACKS:
        raise AcceleratorInputError(f"fallback must be 'eager' or 'error'; got {fallback!r}")
    dynamic = options.get("dynamic") or "buckets"
    if dynamic not in DYNAMIC:
        raise AcceleratorInputError(f"dynamic must be one of {', '.join(DYNAMIC)}; got {dynamic!r}")
    return fallback, dynamic


def parse_options(options: dict | None, backend: str, cuda_graphs: bool = False) -> CompileOptions:
    """Validates the Accelerate Model options; raises AcceleratorInputError naming the bad value."""
    options = dict(options or {})
    fallback, dynamic = fallback_and_dynamic(options)
    mode = options.get("mode") or "default"
    if mode not in MODES:
        raise AcceleratorInputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    limit = options.get("max_buckets", MAX_BUCKETS)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 64:
        raise AcceleratorInputError(f"max_buckets must be a whole number 1..64; got {limit!r}")
    node_id = options.get("node_id")
    scope = options.get("scope") or "auto"
    if scope not in SCOPES:
        raise AcceleratorInputError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    return CompileOptions(backend=backend, mode=mode, dynamic=dynamic, fallback=fallback, cuda_graphs=cuda_graphs,
                          node_id=None if node_id is None else str(node_id), max_buckets=limit, scope=scope)


class Compiler:
    """What a backend provides. Subclasses override `compile_module` and `compile_function`; the artifact
    methods are optional (a backend without portable artifacts recompiles in a new process)."""

    name = "compiler"
    artifact_accelerator: str | None = None   # the cache key's accelerator name for warm-restart artifacts
    freezes_python = False   # a tracer (TorchScript) bakes the forward's Python: graph-unsafe calls run eager
    channels_last = False    # the UNet's convolution weights are kept channels-last (see channels_last_weights)

    def __init__(self, options: CompileOptions):
        self.options = options
        self.compile_events: list[dict] = []   # one per backend compile, appended by the backend

    def compile_module(self, unet) -> Callable:
        raise NotImplementedError

    def compile_function(self, fn: Callable, name: str) -> Callable:
        raise NotImplementedError

    def artifact_options(self) -> dict:
        return {"mode": self.options.mode, "dynamic": self.options.dynamic}

    def save_artifacts(self) -> bytes | None:
        return None

    def load_artifacts(self, blob: bytes) -> str:
        return ""

    def cache_counters(self) -> dict:
        return {}

    def warm_start(self):
        """Context for a compile whose artifacts were just loaded from the cache (nothing left to generate)."""
        return contextlib.nullcontext()

    # a backend that can build an ahead-of-time package of the whole UNet (no tracing in a new process) names
    # its cache accelerator here and implements `build_package` / `load_package` / `package_files` (and
    # `probe_packages` where a package's loader may crash the process: see aot_package.py)
    package_accelerator: str | None = None
    package_kind = "AOTInductor package"   # what notices and the cache's records call one
    package_needs_probe = True   # a small package is checked in a child process before the first UNet package
    package_format = 0           # the package files' format version, part of their cache key

    def probe_packages(self, device, dtype, folder) -> str:
        """"" when a small package of this kind loads in a child process here, else the child's failure."""
        raise NotImplementedError

    def build_package(self, unet, inputs: tuple, transformer_options: dict, folder):
        raise NotImplementedError

    def load_package(self, folder, unet, transformer_options: dict):
        """The stored package in `folder`, for `unet` (bound by the session before use)."""
        raise NotImplementedError

    def package_files(self, folder) -> dict:
        """The built package's files as {name: bytes}, for the artifact store."""
        raise NotImplementedError


# ---- shape buckets ------------------------------------------------------------------------------------------
def bucket_of(x, context, y) -> tuple:
    """(batch, latent height, latent width, tokens, y width, dtype, device, frames): what a static graph is built
    for (frames: a video model's latent frames, 0 for 4-D latents)."""
    tokens = int(context.shape[1]) if context is not None and context.dim() >= 2 else 0
    return (int(x.shape[0]), int(x.shape[-2]), int(x.shape[-1]), tokens,
            int(y.shape[-1]) if y is not None else 0, str(x.dtype).removeprefix("torch."), str(x.device),
            int(x.shape[2]) if x.dim() == 5 else 0)


def segment_bucket(name: str, unet_bucket: tuple) -> tuple:
    """A DeepCache segment's bucket: the segment's name and the UNet call's bucket."""
    return (name, unet_bucket)


def _unet_bucket(bucket: tuple) -> tuple:
    return bucket[1] if isinstance(bucket[0], str) else bucket


def bucket_kind(bucket: tuple) -> str:
    return bucket[0] if isinstance(bucket[0], str) else "unet"


def describe_bucket(bucket: tuple) -> str:
    batch, h, w, tokens = _unet_bucket(bucket)[:4]
    frames = _unet_bucket(bucket)[7] if len(_unet_bucket(bucket)) > 7 else 0
    shape = f"batch {batch}, {f'{frames} latent frames of ' if frames else ''}{w * 8}×{h * 8} px, {tokens} tokens"
    return f"{bucket[0]} at {shape}" if isinstance(bucket[0], str) else shape


def bucket_profile(bucket: tuple) -> dict:
    batch, h, w, tokens = _unet_bucket(bucket)[:4]
    profile = {"batch": batch, "height": h * 8, "width": w * 8, "tokens": tokens}
    frames = _unet_bucket(bucket)[7] if len(_unet_bucket(bucket)) > 7 else 0
    return {**profile, "frames": frames} if frames else profile


# ---- what compiled code (and a graph) can honour -------------------------------------------------------------
def foreign_unet_wrappers(transformer_options: dict) -> list[str]:
    wrappers = (transformer_options.get("wrappers") or {}).get("diffusion_model") or {}
    return sorted(k for k, fns in wrappers.items() if fns and k != DEEPCACHE_WRAPPER_KEY)


def has_deepcache(transformer_options: dict) -> bool:
    wrappers = (transformer_options.get("wrappers") or {}).get("diffusion_model") or {}
    return bool(wrappers.get(DEEPCACHE_WRAPPER_KEY))


def _patch_functions(transformer_options: dict):
    for name, fns in (transformer_options.get("patches") or {}).items():
        for fn in fns or ():
            yield name, fn
    for name, table in (transformer_options.get("patches_replace") or {}).items():
        for where, fn in (table or {}).items():
            yield f"{name}{where}", fn


def patch_signature(transformer_options: dict) -> tuple:
    """Identifies the patches in effect: a graph captured with one set is replayed only with the same set."""
    return tuple((name, id(fn)) for name, fn in _patch_functions(transformer_options))


def graph_unsafe_reason(control, transformer_options: dict, kwargs: dict) -> str:
    """Why this call must not replay a captured graph ('' when it may)."""
    if control is not None:
        return "a ControlNet is applied (its residuals change every step)"
    for name, fn in _patch_functions(transformer_options):
        module = getattr(fn, "__module__", "") or ""
        if not module.startswith(GRAPH_SAFE_PATCH_MODULES):
            return f"the {name} patch from {module or 'an unknown module'} may keep per-step state"
    extra = sorted(k for k, v in kwargs.items() if v is not None)
    if extra:
        return f"the call has extra inputs ({', '.join(extra)})"
    override = transformer_options.get("optimized_attention_override")
    if override is not None and override is not sdpa_attention_override:
        return "an attention override is set"
    return ""


def sdpa_attention_override(func, *args, **kwargs):
    """ComfyUI's attention override hook, pointing at its own SDPA attention (see use_compile_friendly_attention)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


_CHUNKED_ATTENTION = ("attention_sub_quad", "attention_split")


def exception_line(exc: Exception) -> str:
    """An exception as one short line for a notice: its type and the first line of its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''}"


def use_compile_friendly_attention(transformer_options: dict) -> None:
    """Under compilation, ComfyUI's memory-chunked attentions (its CPU / low-memory defaults) ask psutil for free
    memory inside every attention call: a graph break per call and a chunking that changes between runs. Where
    the host chose one of them and no node set an override, this call uses the host's own SDPA attention through
    the official `optimized_attention_override` hook: the same math, one graph."""
    if transformer_options.get("optimized_attention_override") is not None:
        return
    from comfy.ldm.modules import attention

    chosen = getattr(attention.optimized_attention, "__name__", "")
    if chosen in _CHUNKED_ATTENTION:
        transformer_options["optimized_attention_override"] = sdpa_attention_override


def weights_signature(unet) -> tuple:
    """Where the UNet's tensors live: a captured graph reads these addresses."""
    return tuple(t.data_ptr() for t in unet.parameters()) + tuple(t.data_ptr() for t in unet.buffers())


def channels_last_weights(unet) -> int:
    """Stores the UNet's 4-D (convolution) weights channels-last, the layout cuDNN's convolutions and inductor's
    layout optimisation use on a GPU, and returns how many it changed. Values stay the same, only the memory
    layout changes, and the Parameter objects stay. Without it inductor converts every convolution weight on
    every call: on an H100 that took SD1.5's graphed UNet call from 6.60 to 7.44 ms (docs/benchmarks.md).
    ComfyUI keeps the layout from then on: it moves weights with `.to()` and patches LoRAs in place with
    `copy_` (both keep it); where it replaces a Parameter (an unpatch without in-place update) the session
    converts again before the next run."""
    import torch

    changed = 0
    with torch.inference_mode(False), torch.no_grad():   # the weights must not become inference tensors
        for param in unet.parameters():
            if param.dim() == 4 and not param.is_contiguous(memory_format=torch.channels_last):
                param.data = param.data.contiguous(memory_format=torch.channels_last)
                changed += 1
    return changed


def miss_reason(store, key, lookup) -> str:
    """Why the store had no entry for `key`: the key fields that differ from its nearest entry, or the reason."""
    reasons = store.explain_miss(key) if lookup.reason == "not cached" else [lookup.reason]
    return "; ".join(reasons) or lookup.reason


# ---- the session: one accelerated model (shared by its clones) ----------------------------------------------------
@dataclass
class _Bucket:
    compiled: bool = False
    failed: str = ""
    seconds: float = 0.0
    saved: bool = False


@dataclass
class CompileSession:
    compiler: Compiler
    options: CompileOptions
    get_store: Callable | None = None
    model_config: dict = field(default_factory=dict)
    served: Served | None = None    # what the lane compiles of this model (None: a UNet, whole)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        self.lock = threading.RLock()
        self.module_compiled: dict[int, Callable] = {}
        self.functions: dict[tuple, Callable] = {}
        self.buckets: dict[tuple, _Bucket] = {}
        self.refused: dict[tuple, str] = {}
        self.failed: str = ""
        self.graphs = GraphSet(self) if self.options.cuda_graphs else None
        self.weights_seen: tuple | None = None
        self.last_run_marker = None
        self.last_layout_marker = None
        self.loaded_entries: set[str] = set()
        self.packages: dict[tuple, object] = {}   # bucket -> AOT package of the whole UNet (graph path)
        self.packages_from_cache: set[tuple] = set()   # buckets whose package was loaded, not built
        self.package_failed: str = ""
        self.calls = {"compiled": 0, "graph": 0, "eager": 0, "segments": 0}
        # set by the stand-in for each DeepCache call, read by the segment compiler during it
        self.segment_call: tuple = ({}, None, "no graphs")   # (transformer_options, UNet bucket, graph reason)

    # -- diagnostics -----------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.options.backend

    def notice(self, message: str, level: str = "warning", once: str | None = None) -> None:
        events.notice(self.name, message, level=level, node_id=self.options.node_id,
                      once_key=None if once is None else f"{self.name}:{self.token}:{once}")

    def fallback(self, reason: str, run_eager: Callable):
        if self.options.fallback == "error":
            raise BackendUnavailable(f"{self.name}: {reason}")
        self.notice(f"{reason}; running eager", once=reason)
        self.calls["eager"] += 1
        return run_eager()

    # -- shape policy ----------------------------------------------------------------------------------------
    def admit(self, bucket: tuple) -> str:
        """'' when this bucket may run compiled, else why not (static policy, too many buckets)."""
        if bucket in self.buckets:
            return self.buckets[bucket].failed
        kind = bucket_kind(bucket)
        known = [b for b, state in self.buckets.items() if not state.failed and bucket_kind(b) == kind]
        if self.options.dynamic == "static" and known:
            return (f"{describe_bucket(bucket)} differs from the compiled shape {describe_bucket(known[0])} "
                    f"and the dynamic-shape policy is 'static'")
        if self.options.dynamic == "buckets" and len(known) >= self.options.max_buckets:
            return (f"{describe_bucket(bucket)} would be shape bucket {len(known) + 1}, over the limit of "
                    f"{self.options.max_buckets} (use dynamic shapes for many sizes)")
        return ""

    # -- warm restart ----------------------------------------------------------------------------------------
    def artifact_key(self, bucket: tuple):
        from .cache import ArtifactKey

        accelerator = self.compiler.artifact_accelerator
        if accelerator is None:
            return None
        profile = {} if self.options.dynamic == "dynamic" else bucket_profile(bucket)
        options = {**self.compiler.artifact_options(), "part": bucket_kind(bucket)}
        if self.by_blocks:
            options["scope"] = BLOCKS
        unet_bucket = _unet_bucket(bucket)
        return ArtifactKey.build(accelerator=accelerator, options=options, model_config=self.model_config,
                                 profile=profile, dtype=unet_bucket[5], device=unet_bucket[6])

    def _store(self):
        if self.get_store is None:
            return None
        try:
            return self.get_store()
        except Exception as exc:  # no cache folder (read-only disk, ...): compile without it
            self.notice(f"artifact cache unavailable ({exc}); compiling without warm restart", once="no-store")
            return None

    def load_warm_artifacts(self, bucket: tuple) -> bool:
        """Loads this bucket's artifacts from the store; True when they are in (now or by an earlier bucket)."""
        store = self._store()
        key = self.artifact_key(bucket) if store is not None else None
        if key is None:
            return False
        lookup = store.lookup(key)
        if lookup.entry is None:
            self.notice(f"cache miss for {describe_bucket(bucket)}: {miss_reason(store, key, lookup)}; compiling",
                        level="info")
            return False
        if lookup.entry.id in self.loaded_entries:
            return True
        blob = (lookup.entry.path / "compiled.bin").read_bytes()
        info = self.compiler.load_artifacts(blob)
        self.loaded_entries.add(lookup.entry.id)
        self.notice(f"warm start: compiled artifacts for {describe_bucket(bucket)} loaded from the cache "
                    f"(entry {lookup.entry.id[:12]}{', ' + info if info else ''})", level="info")
        return True

    def save_warm_artifacts(self, bucket: tuple) -> None:
        store = self._store()
        key = self.artifact_key(bucket) if store is not None else None
        if key is None:
            return
        blob = self.compiler.save_artifacts()
        if not blob:
            return
        try:
            entry = store.put(key, {"compiled.bin": blob}, meta={
                "family": self.model_config.get("family", "?"), "backend": self.name,
                "profile": describe_bucket(bucket), "seconds": round(self.buckets[bucket].seconds, 1)})
            self.loaded_entries.add(entry.id)
        except Exception as exc:  # a full disk must not fail the image
            self.notice(f"could not store compiled artifacts: {exc}", once="store-failed")

    # -- the compiled callables ------------------------------------------------------------------------------
    @property
    def by_blocks(self) -> bool:
        return self.served is not None and self.served.scope == BLOCKS

    def compiled_block(self, block_class: type) -> Callable:
        """The compiled code every block of this class runs through (compiled_dit.py)."""
        key = ("block", block_class)
        found = self.functions.get(key)
        if found is None:
            with self.lock:
                found = self.functions.get(key)
                if found is None:
                    found = self.functions[key] = self.compiled_function(f"block {block_class.__name__}",
                                                                         block_function(block_class))
        return found

    def run_blocks(self, unet, call: Callable):
        """`call()` (the model's own forward) with every repeated block running compiled."""
        with blocks_compiled(unet, self.served, self.compiled_block):
            return call()

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

    def run_bucket(self, bucket: tuple, run: Callable, run_eager: Callable, packaged: bool = False):
        """Runs `run()` for a bucket, with compile progress, diagnostics and artifacts on its first use
        (`packaged`: `run` uses an AOT package, which is its own artifact: no compile-cache artifacts)."""
        state = self.buckets.get(bucket)
        if state is not None and state.compiled:
            before = len(self.compiler.compile_events)
            out = run()
            if len(self.compiler.compile_events) != before:
                self.explain_recompile(bucket)
            return out
        state = self.buckets.setdefault(bucket, _Bucket())
        self.wait_for_compiler_imports()
        task = self.first_use_task(bucket, packaged)
        events.progress(task, 0, 1, accelerator=self.name, node_id=self.options.node_id)
        started = time.monotonic()
        counters = self.compiler.cache_counters()
        try:
            warm = not packaged and self.load_warm_artifacts(bucket)
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
        done = "ready (loaded from the cache, nothing compiled)" if bucket in self.packages_from_cache \
            else "compiled"
        self.notice(f"{done} for {describe_bucket(bucket)} in {state.seconds:.1f} s{detail}", level="info")
        if not packaged or bucket not in self.packages:  # a failed package fell back to the compiled module
            self.save_warm_artifacts(bucket)
        return out

    def wait_for_compiler_imports(self) -> None:
        """Nothing compiles or loads while the startup thread imports the compiler (accelerators/preimport.py)."""
        from . import preimport

        waited = preimport.wait()
        if waited > 0.1:
            self.notice(f"waited {waited:.1f} s for the compiler's modules (imported in the background since "
                        f"startup)", level="info", once="preimport-wait")

    def first_use_task(self, bucket: tuple, packaged: bool) -> str:
        """The progress line of a bucket's first call: a stored package is loaded, not compiled (seconds either
        way, so the toast should not say "compiling" on a warm start)."""
        where = f"({self.name}) for {describe_bucket(bucket)}"
        if packaged and (bucket in self.packages_from_cache or self._package_stored(bucket)):
            return f"loading the compiled UNet {where} from the cache"
        return f"compiling the UNet {where}"

    def _package_stored(self, bucket: tuple) -> bool:
        try:
            store = self._store()
            return store is not None and self.package_key(bucket) in store   # a manifest check, no hashing
        except Exception:   # an unreadable cache: the load itself reports it
            log.debug("package lookup for the progress line", exc_info=True)
            return False

    def explain_recompile(self, bucket: tuple) -> None:
        reason = self.compiler.last_recompile_reason() if hasattr(self.compiler, "last_recompile_reason") else ""
        self.notice(f"recompiled for {describe_bucket(bucket)}: {reason or 'a guard failed'}", level="info")

    # -- ahead-of-time packages (the whole UNet, graph path) ------------------------------------------------------
    def uses_package(self, transformer_options: dict) -> bool:
        """Whether plain UNet calls run from an AOT package: the backend builds them and no patch is set (a
        package bakes the forward, patches included, into one signature); a model compiled by blocks never."""
        return (self.compiler.package_accelerator is not None and not self.package_failed and not self.by_blocks
                and not patch_signature(transformer_options))

    def package_key(self, bucket: tuple, part: str = "unet-package"):
        """The package's key; part="unet-package-unusable" is the record that packages failed to load here,
        part="package-probe" the environment probe's outcome."""
        from .cache import ArtifactKey

        unet_bucket = _unet_bucket(bucket)
        # a package is built for one shape; a load failure says something about the environment and the
        # architecture, so its record covers every shape, and the probe's every architecture too
        profile = bucket_profile(bucket) if part == "unet-package" else None
        model_config = {} if part == PACKAGE_PROBE else self.model_config
        return ArtifactKey.build(accelerator=self.compiler.package_accelerator,
                                 options={**self.compiler.artifact_options(), "part": part,
                                          "package_format": self.compiler.package_format},
                                 model_config=model_config, profile=profile,
                                 dtype=unet_bucket[5], device=unet_bucket[6])

    def package_environment_problem(self, store, bucket: tuple, x) -> str:
        """"" when a small package of the UNet package's kind loads, runs and graph-captures in a child process
        on this device and dtype, else the child's failure: read from the store's record, or probed now (seconds)
        and recorded, so that an environment whose loader crashes costs one probe instead of a UNet build."""
        import json
        import shutil
        import tempfile

        key = self.package_key(bucket, PACKAGE_PROBE)
        entry = store.get(key)
        if entry is not None:
            try:
                return json.loads((entry.path / PROBE_OUTCOME_FILE).read_text()).get("problem", "")
            except (OSError, ValueError, AttributeError):
                pass   # an unreadable record: probe again and overwrite it
        self.notice("checking once that ahead-of-time packages load on this machine (a small test package)",
                    level="info", once="package-probe")
        folder = Path(tempfile.mkdtemp(prefix="comfy_accel_probe_"))
        try:
            problem = self.compiler.probe_packages(x.device, x.dtype, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        kind = f"record: {self.compiler.package_kind}s {'do not load' if problem else 'load'} here"
        try:
            store.put(key, {PROBE_OUTCOME_FILE: json.dumps({"problem": problem}).encode()},
                      meta={"family": "any", "backend": self.name, "profile": "any", "kind": kind})
        except Exception as exc:
            log.debug("could not record the package probe: %s", exc)
        return problem

    def package_for(self, unet, bucket: tuple, inputs: tuple, transformer_options: dict):
        """This bucket's package, bound to `unet`'s weights: from memory, from the store, or built now."""
        package = self.packages.get(bucket)
        if package is None:
            package = self._load_or_build_package(unet, bucket, inputs, transformer_options)
            self.packages[bucket] = package
        if package.needs_rebind(unet):
            package.bind(unet)
        return package

    def _load_or_build_package(self, unet, bucket, inputs, transformer_options):
        import shutil
        import tempfile

        from .aot_package import PackageUnusable

        store = self._store()
        if store is None:   # a package pays off only in a later process, through the cache: not worth a build
            raise PackageUnusable("no artifact cache to keep it in")
        key = self.package_key(bucket)
        unusable = store.get(self.package_key(bucket, UNUSABLE_PACKAGE))
        if unusable is not None:   # a child process already failed to load one here: do not build again
            reason = (unusable.path / UNUSABLE_REASON_FILE).read_text(errors="replace").strip()
            raise PackageUnusable(f"{reason} (recorded in the cache, entry {unusable.id[:12]}; delete it "
                                  f"to try again)")
        lookup = store.lookup(key)
        kind = self.compiler.package_kind
        if lookup.entry is not None:
            started = time.monotonic()
            package = self.compiler.load_package(lookup.entry.path, unet, transformer_options)
            self.packages_from_cache.add(bucket)
            self.notice(f"warm start: {kind} for {describe_bucket(bucket)} loaded from the cache in "
                        f"{time.monotonic() - started:.1f} s (entry {lookup.entry.id[:12]}); nothing to trace or "
                        f"compile", level="info")
            return package
        problem = self.package_environment_problem(store, bucket, inputs[0]) \
            if self.compiler.package_needs_probe else ""
        if problem:
            raise PackageUnusable(f"a test package did not load here: {problem} (recorded in the cache, entry "
                                  f"{self.package_key(bucket, PACKAGE_PROBE).id[:12]}; delete it to try again)")
        self.notice(f"cache miss for the {kind} at {describe_bucket(bucket)}: "
                    f"{miss_reason(store, key, lookup)}; compiling", level="info")
        folder = Path(tempfile.mkdtemp(prefix="comfy_accel_package_"))
        try:
            try:
                package = self.compiler.build_package(unet, inputs, transformer_options, folder)
            except PackageUnusable as exc:
                try:   # remembered, so that the next process does not spend a build on it
                    store.put(self.package_key(bucket, UNUSABLE_PACKAGE), {UNUSABLE_REASON_FILE: str(exc).encode()},
                              meta=self._package_meta(bucket, f"record: {kind}s do not load here"))
                except Exception as store_exc:
                    log.debug("could not record the unusable package: %s", store_exc)
                raise
            try:
                store.put(key, self.compiler.package_files(folder), meta=self._package_meta(bucket, kind))
            except Exception as exc:  # a full disk must not fail the image
                self.notice(f"could not store the compiled UNet package: {exc}", once="store-failed")
            return package
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the loader has its own copy of the library

    def _package_meta(self, bucket: tuple, kind: str) -> dict:
        return {"family": self.model_config.get("family", "?"), "backend": self.name,
                "profile": describe_bucket(bucket), "kind": kind}

    def drop_package(self, bucket: tuple, call, exc: Exception) -> bool:
        """The package `call` failed in this process (its graph capture): packages are off for this session
        and the bucket uses torch.compile. False when `call` was not a package."""
        if call is not self.packages.get(bucket):
            return False
        self.packages.pop(bucket, None)
        self.package_failed = exception_line(exc)
        log.debug("package failure", exc_info=True)
        self.notice(f"the ahead-of-time UNet package failed here ({self.package_failed}); using torch.compile",
                    once="package-failed")
        return True

    def graph_callable(self, unet, bucket: tuple, inputs: tuple, options: dict) -> Callable:
        """What the whole-UNet CUDA graph captures: the AOT package where there is one, else the module
        compiled by torch.compile (also when the package cannot be built: said once, never eager)."""
        if self.uses_package(options):
            try:
                return self.package_for(unet, bucket, inputs, options)
            except Exception as exc:
                self.package_failed = exception_line(exc)
                log.debug("package failure", exc_info=True)
                self.notice(f"no ahead-of-time package for the UNet ({self.package_failed}); using torch.compile "
                            f"(a new process will trace the UNet again)", once="package-failed")
        if self.by_blocks:
            if len(inputs) == 3:
                return lambda x_, t_, c_: self.run_blocks(unet, lambda: unet(
                    x_, t_, context=c_, transformer_options=dict(options)))
            return lambda x_, t_, c_, y_: self.run_blocks(unet, lambda: unet(
                x_, t_, context=c_, y=y_, transformer_options=dict(options)))
        compiled = self.compiled_module(unet)
        if len(inputs) == 3:
            return lambda x_, t_, c_: compiled(x_, t_, context=c_, transformer_options=dict(options))
        return lambda x_, t_, c_, y_: compiled(x_, t_, context=c_, y=y_, transformer_options=dict(options))

    # -- weights ---------------------------------------------------------------------------------------------
    def prepare_layout(self, unet, transformer_options: dict) -> None:
        """Once per sampling run, before anything is compiled or captured: convolution weights channels-last
        where the backend wants them (a weight ComfyUI replaced since is converted again)."""
        if not self.compiler.channels_last:
            return
        marker = transformer_options.get("sample_sigmas")
        if marker is not None and marker is self.last_layout_marker:
            return
        self.last_layout_marker = marker
        changed = channels_last_weights(unet)
        if changed:
            self.notice(f"{changed} convolution weights stored channels-last (the layout the GPU's convolutions "
                        f"use; values unchanged)", level="info", once=f"layout:{id(unet)}:{changed}")

    # -- graphs ----------------------------------------------------------------------------------------------
    def check_weights(self, unet, transformer_options: dict) -> None:
        """Once per sampling run: graphs captured over tensors that moved since are dropped (re-captured)."""
        marker = transformer_options.get("sample_sigmas")
        if marker is not None and marker is self.last_run_marker:
            return
        self.last_run_marker = marker
        current = weights_signature(unet)
        if self.weights_seen is not None and current != self.weights_seen and self.graphs.keys:
            dropped = self.graphs.release()
            self.notice(f"the UNet's weights moved (offload/reload or a copying LoRA load): re-capturing "
                        f"{dropped} CUDA graph(s)", level="info")
        self.weights_seen = current

    def release(self) -> None:
        """ComfyUI unloads the model: free the graphs (compiled code stays; it holds no device memory)."""
        if self.graphs is not None and self.graphs.keys:
            freed = self.graphs.nbytes
            count = self.graphs.release()
            self.notice(f"model unloaded: released {count} CUDA graph(s), {freed / 2**20:.0f} MiB", level="info")
        self.weights_seen = None

    # -- the segment compiler DeepCache calls ----------------------------------------------------------------
    def segment_compiler(self) -> Callable:
        def compile_segment(name: str, fn: Callable, *tensors):
            options, unet_bucket, graph_reason = self.segment_call
            bucket = segment_bucket(name, unet_bucket)

            def eager():
                return fn(*tensors)

            reason = self.admit(bucket)
            if reason:
                return self.fallback(reason, eager)
            self.calls["segments"] += 1
            compiled = self.compiled_function(name, fn)
            if self.graphs is None or graph_reason:
                return self.run_bucket(bucket, lambda: compiled(*tensors), eager)
            key = (bucket, patch_signature(options))

            def replay():
                captured = self.graphs.get(key)
                if captured is None:
                    # the segment counts in transformer_options (transformer_index, block) as it runs: each
                    # warm-up and the capture start from this call's state, or dynamo sees a new count per call
                    # and recompiles inside the capture (a CUDA error on SDXL)
                    entry_state = dict(options)

                    def from_entry_state(*args):
                        options.clear()
                        options.update(entry_state)
                        return compiled(*args)

                    captured = self.graphs.capture(key, from_entry_state, tensors)
                return captured(*tensors)

            return self.run_bucket(bucket, replay, eager)

        return compile_segment


# ---- the UNet stand-in and the wrapper ------------------------------------------------------------------------
_stand_in_class = None


def _compiled_unet_class():
    global _stand_in_class
    if _stand_in_class is not None:
        return _stand_in_class
    import torch

    class CompiledUNet(torch.nn.Module):
        """Stands in for `diffusion_model` during one apply_model call: compiled, graph-replayed or eager."""

        def __init__(self, unet, session: CompileSession):
            super().__init__()
            object.__setattr__(self, "unet", unet)   # not a submodule: the swap must not re-parent the UNet
            object.__setattr__(self, "session", session)

        @property
        def dtype(self):
            return self.unet.dtype

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                    **kwargs):
            unet, session = self.unet, self.session

            def eager():
                return unet(x, timesteps, context=context, y=y, control=control,
                            transformer_options=transformer_options, **kwargs)

            if session.failed:
                return session.fallback(session.failed, eager)
            bucket = bucket_of(x, context, y)
            if has_deepcache(transformer_options):
                return self.forward_segments(eager, bucket, control, transformer_options, kwargs)
            foreign = foreign_unet_wrappers(transformer_options)
            if foreign:
                return session.fallback(f"the UNet is wrapped by {', '.join(foreign)}, whose step logic compiled "
                                        f"code could freeze", eager)
            reason = session.admit(bucket)
            if reason:
                return session.fallback(reason, eager)
            session.prepare_layout(unet, transformer_options)
            use_compile_friendly_attention(transformer_options)
            graph_reason = graph_unsafe_reason(control, transformer_options, kwargs) if session.graphs else ""
            if session.graphs is not None and not graph_reason:
                return session.run_bucket(bucket, lambda: self.replay(bucket, x, timesteps, context, y,
                                                                      transformer_options), eager,
                                          packaged=session.uses_package(transformer_options))
            if graph_reason and session.compiler.freezes_python:
                return session.fallback(graph_reason, eager)
            if graph_reason:
                session.notice(f"CUDA graphs off for these calls: {graph_reason}; running compiled",
                               level="info", once=graph_reason)
            if session.by_blocks:
                session.calls["compiled"] += 1
                return session.run_bucket(bucket, lambda: session.run_blocks(unet, eager), eager)
            compiled = session.compiled_module(unet)
            session.calls["compiled"] += 1
            return session.run_bucket(bucket, lambda: compiled(
                x, timesteps, context=context, y=y, control=control, transformer_options=transformer_options,
                **kwargs), eager)

        def replay(self, bucket, x, timesteps, context, y, transformer_options):
            session, unet = self.session, self.unet
            session.check_weights(unet, transformer_options)
            key = (bucket, patch_signature(transformer_options))
            captured = session.graphs.get(key)
            if captured is None:
                # the options the graph is captured with: no per-run tensors (sigmas) kept alive by it
                options = {k: v for k, v in transformer_options.items()
                           if k not in ("sigmas", "sample_sigmas", "uuids", "cond_or_uncond")}
                inputs = (x, timesteps, context) if y is None else (x, timesteps, context, y)
                call = session.graph_callable(unet, bucket, inputs, options)
                try:
                    captured = session.graphs.capture(key, call, inputs)
                except Exception as exc:
                    if not session.drop_package(bucket, call, exc):
                        raise
                    captured = session.graphs.capture(key, session.graph_callable(unet, bucket, inputs, options),
                                                      inputs)
                session.weights_seen = weights_signature(unet)
            session.calls["graph"] += 1
            out = captured(x, timesteps, context) if y is None else captured(x, timesteps, context, y)
            return out.clone()  # the next replay overwrites the static output

        def forward_segments(self, eager, bucket, control, transformer_options, kwargs):
            session = self.session
            if control is not None:
                return session.fallback("a ControlNet is applied under DeepCache", eager)
            session.prepare_layout(self.unet, transformer_options)
            use_compile_friendly_attention(transformer_options)
            graph_reason = "no graphs"
            if session.graphs is not None:
                session.check_weights(self.unet, transformer_options)
                graph_reason = graph_unsafe_reason(None, transformer_options, kwargs)
                if graph_reason:
                    session.notice(f"CUDA graphs off for these calls: {graph_reason}; running compiled",
                                   level="info", once=graph_reason)
            session.segment_call = (transformer_options, bucket, graph_reason)
            transformer_options[COMPILER_KEY] = session.segment_compiler()
            out = eager()
            # a graph's static output is overwritten by its next replay: hand the sampler its own copy
            return out.clone() if not graph_reason else out

    _stand_in_class = CompiledUNet
    return CompiledUNet


def compile_wrapper_factory(session: CompileSession) -> Callable:
    from comfy.patcher_extension import WrappersMP

    def compile_wrapper(executor, *args, **kwargs):
        base = executor.class_obj
        unet = base.diffusion_model
        if isinstance(unet, _compiled_unet_class()):  # nested (a second Accelerate Model): the outer one runs
            return executor(*args, **kwargs)
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
        core_compile = ((options.get("wrappers") or {}).get(WrappersMP.APPLY_MODEL) or {}).get(CORE_COMPILE_KEY)
        if core_compile or hasattr(unet, "_orig_mod"):   # core's TorchCompileModel applied after this node
            session.notice("ComfyUI's TorchCompileModel was applied after Accelerate Model: its compiled model "
                           "runs and Accelerate Model stands aside (one compiler per model)", once="core-compile")
            return executor(*args, **kwargs)
        base.diffusion_model = _compiled_unet_class()(unet, session)
        try:
            return executor(*args, **kwargs)
        finally:
            base.diffusion_model = unet
    compile_wrapper.comfy_accel_session = session
    return compile_wrapper


CORE_COMPILE_KEY = "torch.compile"   # the APPLY_MODEL wrapper key of core's set_torch_compile_wrapper


def compile_clone(model):
    """The clone the lane compiles. ComfyUI master's dynamic VRAM (comfy-aimdo) pages weights in per block
    through a VBAR, which compiled code cannot follow; its own TorchCompileModel therefore demotes the model to a
    plain ModelPatcher with `clone(disable_dynamic=True)` (PR #12612). The lane does the same where the host has
    it (`is_dynamic`, master); on ComfyUI 0.3.75 every ModelPatcher is plain and this is `clone()`."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return model.clone(disable_dynamic=True)
    return model.clone()


def attach(model, session: CompileSession):
    """A clone of `model` whose UNet runs through `session` (weights patched in place, graphs freed on unload)."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    patched = compile_clone(model)
    if patched.get_wrappers(WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY):
        # core's TorchCompileModel before this node: one compiler per model, the later choice wins
        patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY)
        session.notice("replaces ComfyUI's TorchCompileModel applied before it on this model (one compiler per "
                       "model)", level="info", once="core-compile-replaced")
    # the host's own switch: LoRA/weight patches are copied into the existing tensors instead of replacing
    # them, so compiled code and captured graphs keep reading the live weights
    patched.weight_inplace_update = True
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, compile_wrapper_factory(session))

    def on_detach(_patcher, unpatch_all):
        if unpatch_all:
            session.release()

    patched.remove_callbacks_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY)
    patched.add_callback_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY, on_detach)
    return patched


def store_getter(options: dict):
    """options["get_store"] (a callable) or options["store"] (an ArtifactStore or None) as a callable."""
    if callable(options.get("get_store")):
        return options["get_store"]
    store = options.get("store")
    return (lambda: store) if store is not None else None


def apply_backend(model, options: dict | None, backend: str, available: Callable, make_compiler: Callable,
                  cuda_graphs: bool, regional: bool = False):
    """What every compile backend's `apply` does: validate, check the model (`served_model`: SD UNets whole, DiTs
    block by block where the backend is `regional`), run eager with the reason (or raise under the `error`
    policy) when the model or the backend cannot be served here, else attach a session with its compiler."""
    from . import events

    options = dict(options or {})
    parsed = parse_options(options, backend, cuda_graphs=cuda_graphs)
    served = served_model(model, backend, regional, parsed.scope)
    if not served:
        if parsed.fallback == "error" or getattr(getattr(model, "model", None), "diffusion_model", None) is None:
            raise AcceleratorInputError(served.reason)
        events.notice(backend, f"{served.reason}; running eager", node_id=parsed.node_id)
        return model.clone()
    ready = available()
    if not ready:
        if parsed.fallback == "error":
            raise BackendUnavailable(f"{backend}: {ready.reason}")
        events.notice(backend, f"{ready.reason}; running eager", node_id=parsed.node_id)
        return model.clone()
    session = CompileSession(make_compiler(parsed), parsed, get_store=store_getter(options),
                             model_config=model_config_fields(model), served=served)
    if served.scope == BLOCKS or served.model_class != "UNetModel":
        events.notice(backend, f"compiles {served.describe()}", level="info", node_id=parsed.node_id)
    return attach(model, session)


def session_of(model) -> CompileSession | None:
    """The compile session attached to a ModelPatcher (for tests, the UI and diagnostics)."""
    for fn in (getattr(model, "wrappers", {}) or {}).get("apply_model", {}).get(WRAPPER_KEY, []):
        session = getattr(fn, "comfy_accel_session", None)
        if session is not None:
            return session
    return None


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

