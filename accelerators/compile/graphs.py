"""CUDA graphs and weight layout for the compile lane: one captured call per shape bucket, kept in the
process-wide live-object cache so that ComfyUI unloading the model (or the memory budget) frees them; the check
that the weights a graph reads have not moved; convolution weights kept channels-last.

We capture ourselves instead of using torch.compile's `mode="reduce-overhead"` (cudagraph trees): the static
inputs are ours, so a LoRA that moves the weights costs a re-capture (milliseconds) rather than a re-record
through dynamo, and freeing the graphs is one call.

What one graph carries (`carry_call`), the same for SD UNets and DiTs: every tensor input of the diffusion model's
call (the latent, timesteps, text context, `y`, and whatever else the family takes: Flux's `guidance`, LTXV's
`attention_mask`, Flux Kontext's list of `ref_latents`) becomes a static input the replay copies into; what the
graph bakes in (their shapes and dtypes, the call's non-tensor inputs such as Lumina's `num_tokens`, and the
non-tensor `transformer_options` such as `rope_options`) is part of its key, so a change is a new graph, never a
stale one. An input it can neither carry nor key keeps the call off the graph, with the reason.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

from ..sampling_progress import STEP_KEY

# transformer_options entries that change every run (the schedule, the batch's rows, the pack's own step tracker,
# read around the diffusion model, never inside it): never kept by a graph
PER_RUN_KEYS = ("sigmas", "sample_sigmas", "uuids", "cond_or_uncond", STEP_KEY)
# transformer_options entries the stand-in checks itself (patch_signature, foreign wrappers, the attention
# override): not part of the graph's option signature
CHECKED_KEYS = ("patches", "patches_replace", "wrappers", "callbacks", "optimized_attention_override")
# the call's inputs that come first, in this order: a plain UNet call's tensors are (x, timesteps, context[, y]),
# the signature a precompiled UNet package takes
LEADING = ("context", "y")


def graph_options(transformer_options: dict) -> dict:
    """The options a graph or a trace is made with: no per-run tensors (sigmas) kept alive by it."""
    return {k: v for k, v in transformer_options.items() if k not in PER_RUN_KEYS}


def _plain(value) -> bool:
    """A value that keys a graph by its text: numbers, strings, None and containers of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _tensor_signature(tensor) -> tuple:
    return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), str(tensor.device)


@dataclass(frozen=True)
class CarriedCall:
    """One diffusion-model call as a graph sees it: `tensors` (x, timesteps, then the tensor inputs, flat) are
    copied into the graph's static inputs at every replay; `layout` rebuilds the keyword inputs from them (with
    the non-tensor `constants`); `signature` is what the graph bakes in (part of its key)."""
    tensors: tuple
    layout: tuple       # ((name, count or -1 for a single tensor), ...) of the keyword tensor inputs, in order
    constants: tuple    # ((name, value), ...) of the non-tensor inputs
    signature: tuple

    @property
    def names(self) -> tuple:
        return tuple(name for name, _ in self.layout) + tuple(name for name, _ in self.constants)

    @property
    def plain_unet_call(self) -> bool:
        """(x, timesteps, context[, y]) and nothing else: what a precompiled UNet package takes."""
        return self.names in (("context",), ("context", "y"))

    def rebuild(self, tensors: tuple) -> tuple:
        """(x, timesteps, keyword inputs) with `tensors` in place of the call's own (the static inputs)."""
        kwargs, at = dict(self.constants), 2
        for name, count in self.layout:
            if count < 0:
                kwargs[name], at = tensors[at], at + 1
            else:
                kwargs[name], at = list(tensors[at:at + count]), at + count
        return tensors[0], tensors[1], kwargs


def carry_call(x, timesteps, inputs: dict, transformer_options: dict) -> CarriedCall | str:
    """The call `diffusion_model(x, timesteps, **inputs, transformer_options=...)` (without `control`) as a graph
    carries it, or why it cannot: an input that is neither a tensor, a list of tensors nor a plain value, or a
    transformer option that is not plain."""
    import torch

    order = [k for k in LEADING if inputs.get(k) is not None] + sorted(
        k for k, v in inputs.items() if k not in LEADING and v is not None)
    tensors, layout, constants, signature = [x, timesteps], [], [], [("x", _tensor_signature(x)),
                                                                   ("timesteps", _tensor_signature(timesteps))]
    if timesteps.device != x.device:
        return f"input timesteps is not on the latent's device ({x.device})"
    for name in order:
        value = inputs[name]
        parts = [value] if torch.is_tensor(value) else value if isinstance(value, (list, tuple)) else []
        if any(torch.is_tensor(t) and t.device != x.device for t in parts):
            return f"input {name} is not on the latent's device ({x.device})"   # the graph's kernels run there
        if torch.is_tensor(value):
            tensors.append(value)
            layout.append((name, -1))
            signature.append((name, _tensor_signature(value)))
        elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
            tensors.extend(value)
            layout.append((name, len(value)))
            signature.append((name, tuple(_tensor_signature(v) for v in value)))
        elif _plain(value):
            constants.append((name, value))
            signature.append((name, repr(value)))
        else:
            return f"input {name} ({type(value).__name__}) is neither a tensor nor a plain value"
    options = []
    for key in sorted(k for k in transformer_options if k not in PER_RUN_KEYS and k not in CHECKED_KEYS):
        value = transformer_options[key]
        if not _plain(value):
            return f"transformer option {key} ({type(value).__name__}) is not a plain value a graph can key"
        options.append((key, repr(value)))
    if options:
        signature.append(("transformer_options", tuple(options)))
    return CarriedCall(tuple(tensors), tuple(layout), tuple(constants), tuple(signature))


class OncePerRun:
    """True for the first call of each sampling run: ComfyUI gives every run a new `sample_sigmas` tensor, so
    its identity marks the run (a call without it, outside a sampler, always counts as first)."""

    def __init__(self):
        self.marker = None

    def first(self, transformer_options: dict) -> bool:
        marker = transformer_options.get("sample_sigmas")
        if marker is not None and marker is self.marker:
            return False
        self.marker = marker
        return True


class CapturedCall:
    """One CUDA graph of `fn(*static_inputs)`: replay copies the inputs into place and returns the static outputs."""

    def __init__(self, fn: Callable, inputs: tuple, pool, warmup: int = 2):
        self.inputs = tuple(t.clone() for t in inputs)
        self.record(fn, pool, warmup)

    def record(self, fn: Callable, pool, warmup: int) -> None:
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles (first time), autotunes and settles the allocator off the graph
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)
        self.nbytes = max(0, torch.cuda.memory_reserved() - before) + sum(
            t.numel() * t.element_size() for t in self.inputs)

    def __call__(self, *inputs):
        for static, value in zip(self.inputs, inputs, strict=True):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.replay()
        return self.outputs

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        self.graph = None
        self.outputs = None
        self.inputs = ()


class GraphSet:
    """The captured graphs of one session. The session owns them (they die with it, when the last clone carrying it
    is gone); the process-wide live-object cache holds only a weak handle of each, to account for their memory
    and evict the least recently used beyond its budget, and ComfyUI unloading the model frees them (`unload`).
    Nothing process-wide refers to the session itself: a dropped clone frees its graphs and fp8 copies."""

    call_class = CapturedCall   # what `capture` makes

    def __init__(self, session):  # a session.CompileSession: its token names its graphs, its notices speak
        self.session = session
        self.pool = None
        self.captured: dict = {}
        self.weights_seen: tuple | None = None   # weights_signature when the graphs were captured
        self.failed = ""   # why a DiT's capture failed: its calls run compiled without graphs (graph_path.py)
        self.per_run = OncePerRun()
        # the session gone (gc): its handles leave the live cache, which would count them against its budget
        weakref.finalize(self, _release_token, session.token).atexit = False

    @staticmethod
    def _cache():
        from ..cache.api import live_objects

        return live_objects()

    @property
    def keys(self) -> set:
        return set(self.captured)

    def get(self, key):
        captured = self.captured.get(key)
        if captured is not None:
            self._cache().get((self.session.token, key))   # most recently used
        return captured

    def capture(self, key, fn: Callable, inputs: tuple) -> CapturedCall:
        import torch

        if self.pool is None and torch.cuda.is_available():
            self.pool = torch.cuda.graph_pool_handle()
        captured = self.call_class(fn, inputs, self.pool)
        self.captured[key] = captured
        self._cache().put((self.session.token, key), weakref.ref(self), captured.nbytes, on_evict=_evicted)
        return captured

    def drop(self, key) -> None:
        captured = self.captured.pop(key, None)
        if captured is not None:
            captured.release()

    def release(self) -> int:
        token = self.session.token
        dropped = self._cache().release_matching(lambda k: isinstance(k, tuple) and k and k[0] == token)
        for key in list(self.captured):   # any the cache no longer held
            self.drop(key)
        self.pool = None
        return len(dropped)

    @property
    def nbytes(self) -> int:
        return sum(getattr(captured, "nbytes", 0) for captured in self.captured.values())

    def check_weights(self, unet, transformer_options: dict) -> None:
        """Once per sampling run: graphs captured over tensors that moved since are dropped (re-captured)."""
        if not self.per_run.first(transformer_options):
            return
        current = weights_signature(unet)
        if self.weights_seen is not None and current != self.weights_seen and self.keys:
            dropped = self.release()
            self.session.notice(f"the UNet's weights moved (offload/reload or a copying LoRA load): re-capturing "
                                f"{dropped} CUDA graph(s)", level="info")
        self.weights_seen = current

    def unload(self) -> None:
        """ComfyUI unloads the model: free the graphs (compiled code stays; it holds no device memory)."""
        if self.keys:
            freed = self.nbytes
            count = self.release()
            self.session.notice(f"model unloaded: released {count} CUDA graph(s), {freed / 2**20:.0f} MiB",
                                level="info")
        self.weights_seen = None


def weights_signature(unet) -> tuple:
    """Where the UNet's tensors live: a captured graph reads these addresses."""
    return tuple(t.data_ptr() for t in unet.parameters()) + tuple(t.data_ptr() for t in unet.buffers())


def _evicted(cache_key, owner) -> None:
    """The live cache dropped a graph's handle (budget, release): its owner, if still alive, frees the graph."""
    graphs = owner()
    if graphs is not None:
        graphs.drop(cache_key[1])


def _release_token(token: str) -> None:
    from ..cache.api import live_objects

    live_objects().release_matching(lambda k: isinstance(k, tuple) and k and k[0] == token)


class ChannelsLastLayout:
    """Keeps the UNet's convolution weights channels-last, checked once per sampling run before anything is
    compiled or captured (a weight ComfyUI replaced since is converted again)."""

    def __init__(self, notice: Callable):
        self.notice = notice
        self.per_run = OncePerRun()

    def prepare(self, unet, transformer_options: dict) -> None:
        if not self.per_run.first(transformer_options):
            return
        changed = channels_last_weights(unet)
        if changed:
            self.notice(f"{changed} convolution weights stored channels-last (the layout the GPU's convolutions "
                        f"use; values unchanged)", level="info", once=f"layout:{id(unet)}:{changed}")


def channels_last_weights(unet) -> int:
    """Stores the UNet's 4-D (convolution) weights channels-last, the layout cuDNN's convolutions and inductor's
    layout optimisation use on a GPU, and returns how many it changed. Values stay the same, only the memory
    layout changes, and the Parameter objects stay. Without it inductor converts every convolution weight on
    every call (its cost: docs/benchmarks.md). ComfyUI keeps the layout from then on: it moves weights with
    `.to()` and patches LoRAs in place with `copy_` (both keep it); where it replaces a Parameter (an unpatch
    without in-place update) the layout is converted again before the next run."""
    import torch

    changed = 0
    with torch.inference_mode(False), torch.no_grad():   # the weights must not become inference tensors
        for param in unet.parameters():
            if param.dim() == 4 and not param.is_contiguous(memory_format=torch.channels_last):
                param.data = param.data.contiguous(memory_format=torch.channels_last)
                changed += 1
    return changed
