"""The UNet stand-in: how a fast path (compiled code, a CUDA graph, a TensorRT engine) runs inside ComfyUI's
official hooks, shared by the compile lane and the TensorRT loader.

`attach_stand_in` clones the ModelPatcher and adds one `APPLY_MODEL` wrapper that swaps the BaseModel's
`diffusion_model` for a stand-in for the duration of one `apply_model` call (the pattern of ComfyUI's own
torch.compile helper: never a lasting object patch, so LoRA loaders keep matching keys). The stand-in decides
per call whether its fast path can give the host's result (`unservable_reason`), else runs the real UNet.

The compile lane's stand-in, `CompiledUNet`, decides per call:
- DeepCache wraps the UNet → the real UNet runs (DeepCache's block loop stays Python) and DeepCache's three
  segments go through the session's segment compiler (`segments.py`): each compiled, and graph-captured, once
  per shape;
- another `DIFFUSION_MODEL` wrapper, a shape the dynamic-shape policy refuses → eager, with one notice saying
  why (or an error under the `error` fallback policy);
- otherwise the compiled UNet, and with CUDA graphs a replay of the graph captured for this shape bucket.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

from ..segments import COMPILER_KEY
from . import graph_path
from .dit import run_blocks
from .fp8 import routing
from .graphs import graph_options   # stable_fast imports it from here too

WRAPPER_KEY = "comfy_accel.compile"
DEEPCACHE_WRAPPER_KEY = "comfy_accel.deepcache"
_CHUNKED_ATTENTION = ("attention_sub_quad", "attention_split")


# ---- what a fast path cannot serve ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FastPathLimits:
    """What a fast path (a captured graph, a baked engine) replays faithfully, and how to say why not."""
    control: str                            # why a ControlNet cannot run there
    patch: str                              # why a patch cannot run there
    safe_patch_modules: tuple = ()          # patch functions from these modules hold no per-step state
    served_kwargs: frozenset = frozenset()  # extra UNet inputs it takes
    wrapped: str | None = None              # why another DIFFUSION_MODEL wrapper cannot run there (None: no check)
    own_attention_override: Callable | None = None


def patch_functions(transformer_options: dict):
    """(name, function) of every block patch and replacement in effect."""
    for name, fns in (transformer_options.get("patches") or {}).items():
        for fn in fns or ():
            yield name, fn
    for name, table in (transformer_options.get("patches_replace") or {}).items():
        for where, fn in (table or {}).items():
            yield f"{name}{where}", fn


def patch_signature(transformer_options: dict) -> tuple:
    """Identifies the patches in effect: a graph captured with one set is replayed only with the same set."""
    return tuple((name, id(fn)) for name, fn in patch_functions(transformer_options))


def foreign_unet_wrappers(transformer_options: dict, own: tuple = ()) -> list[str]:
    wrappers = (transformer_options.get("wrappers") or {}).get("diffusion_model") or {}
    return sorted(k for k, fns in wrappers.items() if fns and k not in own)


def has_deepcache(transformer_options: dict) -> bool:
    wrappers = (transformer_options.get("wrappers") or {}).get("diffusion_model") or {}
    return bool(wrappers.get(DEEPCACHE_WRAPPER_KEY))


def unservable_reason(limits: FastPathLimits, control, transformer_options: dict | None, kwargs: dict) -> str:
    """Why this UNet call must not take the fast path ('' when it may)."""
    if control is not None:
        return f"a ControlNet is applied ({limits.control})"
    options = transformer_options or {}
    for name, fn in patch_functions(options):
        module = getattr(fn, "__module__", "") or ""
        if not (limits.safe_patch_modules and module.startswith(limits.safe_patch_modules)):
            return f"the {name} patch from {module or 'an unknown module'} {limits.patch}"
    if limits.wrapped is not None:
        foreign = foreign_unet_wrappers(options)
        if foreign:
            return f"the UNet is wrapped by {', '.join(foreign)}, {limits.wrapped}"
    override = options.get("optimized_attention_override")
    if override is not None and override is not limits.own_attention_override:
        return "an attention override is set"
    extra = sorted(k for k, v in kwargs.items() if k not in limits.served_kwargs and v is not None)
    if extra:
        return f"the call has extra inputs ({', '.join(extra)})"
    return ""


# ---- attention that compiles into one graph -------------------------------------------------------------------
def sdpa_attention_override(func, *args, **kwargs):
    """ComfyUI's attention override hook, pointing at its own SDPA attention (see use_compile_friendly_attention)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


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


# patches whose functions depend only on the tensors they are given (no per-step Python state), so a CUDA
# graph captured with them replays them faithfully. Others run compiled, without a graph.
GRAPH_LIMITS = FastPathLimits(control="its residuals change every step", patch="may keep per-step state",
                              safe_patch_modules=("comfy_extras.nodes_freelunch",),
                              own_attention_override=sdpa_attention_override)


# ---- the swap -------------------------------------------------------------------------------------------------
def swap_wrapper(make_stand_in: Callable) -> Callable:
    """An APPLY_MODEL wrapper that runs the call with `make_stand_in(base_model, unet)` as the diffusion model
    (None: the call runs as it is)."""
    def apply_model_wrapper(executor, *args, **kwargs):
        base_model = executor.class_obj
        unet = base_model.diffusion_model
        stand_in = make_stand_in(base_model, unet)
        if stand_in is None:
            return executor(*args, **kwargs)
        base_model.diffusion_model = stand_in
        try:
            return executor(*args, **kwargs)
        finally:
            base_model.diffusion_model = unet
    return apply_model_wrapper


CORE_COMPILE_KEY = "torch.compile"   # the APPLY_MODEL wrapper key of core's set_torch_compile_wrapper


def compile_clone(model):
    """The clone a fast path runs on. ComfyUI master's dynamic VRAM (comfy-aimdo) pages weights in per block
    through a VBAR, which compiled code and captured graphs cannot follow; its own TorchCompileModel therefore
    demotes the model to a plain ModelPatcher with `clone(disable_dynamic=True)` (PR #12612). This does the same
    where the host has it (`is_dynamic`, master); on ComfyUI 0.3.75 every ModelPatcher is plain: `clone()`."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return model.clone(disable_dynamic=True)
    return model.clone()


def attach_stand_in(model, key: str, make_stand_in: Callable, session=None):
    """A clone of `model` (never mutated) whose apply_model runs through `swap_wrapper(make_stand_in(base_model,
    unet, clone))` under `key`; `session` is kept on the wrapper for `session_of`."""
    from comfy.patcher_extension import WrappersMP

    patched = compile_clone(model)
    # the clone holds the wrapper: a weak reference back, so that a dropped clone is freed at once rather than by
    # the garbage collector, which ComfyUI notices when a chain of clones goes together (its record of the
    # loaded clone is left "dead", and every later sample runs a full gc: tests/accelerators/test_fp8_memory.py)
    clone = weakref.ref(patched)
    wrapper = swap_wrapper(lambda base_model, unet: make_stand_in(base_model, unet, clone()))
    wrapper.comfy_accel_session = session
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, key)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, key, wrapper)
    return patched


def session_of(model, key: str = WRAPPER_KEY):
    """The session attached to a ModelPatcher under `key` (for tests, the UI and diagnostics), or None."""
    for fn in (getattr(model, "wrappers", {}) or {}).get("apply_model", {}).get(key, []):
        session = getattr(fn, "comfy_accel_session", None)
        if session is not None:
            return session
    return None


# ---- the compile lane's stand-in ------------------------------------------------------------------------------
def attach(model, session):
    """A clone of `model` whose UNet runs through the compile `session` (weights patched in place, graphs freed
    on unload; with fp8, its copies' holder as an additional model: fp8_store.py)."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    compiled_unet = _compiled_unet_class()

    def make_stand_in(base_model, unet, _patched):
        if isinstance(unet, compiled_unet):   # nested (a second Accelerate Model): the outer one runs
            return None
        running = getattr(base_model, "current_patcher", None)   # the clone sampling now (a later clone's)
        if hasattr(unet, "_orig_mod") or (running is not None
                                          and running.get_wrappers(WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY)):
            session.notice("ComfyUI's TorchCompileModel was applied after Accelerate Model: its compiled model "
                           "runs and Accelerate Model stands aside (one compiler per model)", once="core-compile")
            return None
        return compiled_unet(unet, session, base_model)

    if model.get_wrappers(WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY):
        # core's TorchCompileModel before this node: one compiler per model, the later choice wins
        session.notice("replaces ComfyUI's TorchCompileModel applied before it on this model (one compiler per "
                       "model)", level="info", once="core-compile-replaced")
    patched = attach_stand_in(model, WRAPPER_KEY, make_stand_in, session)
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY)
    # the host's own switch: LoRA/weight patches are copied into the existing tensors instead of replacing
    # them, so compiled code and captured graphs keep reading the live weights
    patched.weight_inplace_update = True

    def on_detach(_patcher, unpatch_all):
        if unpatch_all:
            session.release()

    patched.remove_callbacks_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY)
    patched.add_callback_with_key(CallbacksMP.ON_DETACH, WRAPPER_KEY, on_detach)
    if session.fp8 is not None:   # new fp8 copies ask ComfyUI for room, keeping this sampling's models loaded
        from .fp8_store import RESIDENCY_KEY, sampling_wrapper

        patched.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sampling_wrapper)
        # the copies, a model of their own to ComfyUI: loaded and unloaded with this one, counted once per set
        store = session.fp8.adopt(model.model.diffusion_model)
        patched.set_additional_models(RESIDENCY_KEY, [store.residency.patcher(model.load_device,
                                                                              model.offload_device)])
    if session.fp8 is not None and hasattr(CallbacksMP, "ON_APPLY_HOOKS"):
        # hook LoRAs patch weights between the calls of a step: the fp8 copies follow (fp8.py)
        patched.remove_callbacks_with_key(CallbacksMP.ON_APPLY_HOOKS, WRAPPER_KEY)
        patched.add_callback_with_key(CallbacksMP.ON_APPLY_HOOKS, WRAPPER_KEY,
                                      lambda patcher, _hooks: session.fp8.hooks_applied(patcher))
    return patched


_stand_in_class = None


def _compiled_unet_class():
    global _stand_in_class
    if _stand_in_class is None:
        _stand_in_class = _define_compiled_unet()
    return _stand_in_class


def _define_compiled_unet():
    import torch

    class CompiledUNet(torch.nn.Module):
        """Stands in for `diffusion_model` during one apply_model call: compiled, graph-replayed or eager."""

        def __init__(self, unet, session, base_model=None):
            super().__init__()
            object.__setattr__(self, "unet", unet)   # not a submodule: the swap must not re-parent the UNet
            object.__setattr__(self, "session", session)
            object.__setattr__(self, "base_model", base_model)   # what the host says is patched (fp8.py)

        @property
        def dtype(self):
            return self.unet.dtype

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                    **kwargs):
            """One route per call, in order: eager with the reason (a call the session refuses); DeepCache's
            segments compiled; the whole UNet replayed as a CUDA graph; the UNet compiled without a graph (a call
            a graph cannot replay faithfully: eager instead where the backend bakes the Python into a trace)."""
            unet, session = self.unet, self.session

            def eager():
                return unet(x, timesteps, context=context, y=y, control=control,
                            transformer_options=transformer_options, **kwargs)

            bucket = session.bucket_of(x, context, y)
            segments = has_deepcache(transformer_options)
            reason = self.refusal(bucket, control, transformer_options, segments)
            if reason:
                return session.fallback(reason, eager)
            session.prepare_layout(unet, transformer_options)
            session.prepare_precision(self.base_model, unet, transformer_options)
            use_compile_friendly_attention(transformer_options)
            if segments:
                graph_reason = unservable_reason(GRAPH_LIMITS, None, transformer_options, kwargs) \
                    if session.graphs is not None else "no graphs"
                return self.forward_segments(eager, bucket, transformer_options, graph_reason)
            graph_reason, carried = self.graph_admission(x, timesteps, context, y, control, transformer_options,
                                                         kwargs)

            def compiled_call():   # a DiT: its own forward, every repeated block through compiled code
                with routing(session):
                    if session.by_blocks:
                        return run_blocks(session, unet, eager)
                    return session.compiled_module(unet)(x, timesteps, context=context, y=y, control=control,
                                                         transformer_options=transformer_options, **kwargs)

            if not graph_reason:
                patches = patch_signature(transformer_options)
                packaged = session.artifacts.uses_package(transformer_options) and carried.plain_unet_call
                return session.run_bucket(bucket, lambda: graph_path.replay(
                    session, unet, bucket, carried, transformer_options, patches, packaged, compiled_call), eager,
                    packaged=packaged, transformer_options=transformer_options)
            if session.graphs is not None and session.compiler.freezes_python:
                return session.fallback(graph_reason, eager)
            self.say_graphs_off(graph_reason)
            if not session.by_blocks:
                session.compiled_module(unet)   # compiled before the bucket's first run is timed
            session.calls["compiled"] += 1
            return session.run_bucket(bucket, compiled_call, eager,
                                      transformer_options=None if session.by_blocks else transformer_options)

        def graph_admission(self, x, timesteps, context, y, control, transformer_options, kwargs) -> tuple:
            """(why this call cannot replay a CUDA graph or '', what the graph carries): every tensor input is
            carried (Flux's guidance, Wan's and LTXV's extra tensors), shapes and non-tensor values key it."""
            graphs, compiler = self.session.graphs, self.session.compiler
            if graphs is None:
                return "no graphs", None
            extra = {} if compiler.carries_extra_inputs else kwargs   # a tracer's UNet takes (x, t, context, y)
            reason = unservable_reason(GRAPH_LIMITS, control, transformer_options, extra) or graphs.failed
            if reason:
                return reason, None
            carried = graph_path.graph_inputs(x, timesteps, context, y, kwargs, graph_options(transformer_options))
            return ("", carried) if not isinstance(carried, str) else (carried, None)

        def refusal(self, bucket, control, transformer_options, segments: bool) -> str:
            """Why this call runs eager ('' when it runs compiled). Under DeepCache each segment is admitted by
            its own shape, in the segment compiler."""
            if segments:
                return "a ControlNet is applied under DeepCache" if control is not None else ""
            foreign = foreign_unet_wrappers(transformer_options, own=(DEEPCACHE_WRAPPER_KEY,))
            if foreign:
                return f"the UNet is wrapped by {', '.join(foreign)}, whose step logic compiled code could freeze"
            return self.session.admit(bucket)

        def say_graphs_off(self, graph_reason: str) -> None:
            if self.session.graphs is not None and graph_reason:
                self.session.notice(f"CUDA graphs off for these calls: {graph_reason}; running compiled",
                                    level="info", once=graph_reason)

        def forward_segments(self, eager, bucket, transformer_options, graph_reason: str):
            session = self.session
            if session.graphs is not None:
                session.graphs.check_weights(self.unet, transformer_options)
                self.say_graphs_off(graph_reason)
            session.segment_call = (transformer_options, bucket, graph_reason)
            transformer_options[COMPILER_KEY] = segment_compiler(session)
            with routing(session):
                out = eager()
            # a graph's static output is overwritten by its next replay: hand the sampler its own copy
            return out.clone() if not graph_reason else out

    return CompiledUNet


def segment_compiler(session) -> Callable:
    """The compiler DeepCache's segments run through during one call (`segments.run_segment`): each segment
    compiled, and with CUDA graphs captured, once per shape bucket."""
    def compile_segment(name: str, fn: Callable, *tensors):
        options, unet_bucket, graph_reason = session.segment_call
        bucket = (name, unet_bucket)

        def eager():
            return fn(*tensors)

        reason = session.admit(bucket)
        if reason:
            return session.fallback(reason, eager)
        session.calls["segments"] += 1
        compiled = session.compiled_function(name, fn)
        if session.graphs is None or graph_reason:
            return session.run_bucket(bucket, lambda: compiled(*tensors), eager, transformer_options=options)
        key = (bucket, patch_signature(options))

        def replay():
            captured = session.graphs.get(key)
            if captured is None:
                # the segment counts in transformer_options (transformer_index, block) as it runs: each
                # warm-up and the capture start from this call's state, or dynamo sees a new count per call
                # and recompiles inside the capture (a CUDA error on SDXL)
                entry_state = dict(options)

                def from_entry_state(*args):
                    options.clear()
                    options.update(entry_state)
                    return compiled(*args)

                captured = session.graphs.capture(key, from_entry_state, tensors)
            return captured(*tensors)

        return session.run_bucket(bucket, replay, eager, transformer_options=options)

    return compile_segment
