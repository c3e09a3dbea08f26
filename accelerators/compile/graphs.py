"""CUDA graphs and weight layout for the compile lane: one captured call per shape bucket, kept in the
process-wide live-object cache so that ComfyUI unloading the model (or the memory budget) frees them; the check
that the weights a graph reads have not moved; convolution weights kept channels-last.

We capture ourselves instead of using torch.compile's `mode="reduce-overhead"` (cudagraph trees): the static
inputs are ours, so a LoRA that moves the weights costs a re-capture (milliseconds) rather than a re-record
through dynamo, and freeing the graphs is one call.
"""
from __future__ import annotations

from typing import Callable


class CapturedCall:
    """One CUDA graph of `fn(*static_inputs)`: replay copies the inputs into place and returns the static outputs."""

    def __init__(self, fn: Callable, inputs: tuple, pool, warmup: int = 2):
        import torch

        self.inputs = tuple(t.clone() for t in inputs)
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
        for static, value in zip(self.inputs, inputs):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.graph.replay()
        return self.outputs

    def release(self) -> None:
        self.graph = None
        self.outputs = None
        self.inputs = ()


class GraphSet:
    """The captured graphs of one session, in the process-wide live-object cache (freed with the model)."""

    def __init__(self, session):  # a session.CompileSession: its token names its graphs, its notices speak
        self.session = session
        self.pool = None
        self.keys: set = set()
        self.weights_seen: tuple | None = None   # weights_signature when the graphs were captured
        self.last_run_marker = None

    def _cache(self):
        from ..cache.api import live_objects

        return live_objects()

    def get(self, key):
        return self._cache().get((self.session.token, key))

    def capture(self, key, fn: Callable, inputs: tuple) -> CapturedCall:
        import torch

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        captured = CapturedCall(fn, inputs, self.pool)
        self.keys.add(key)
        self._cache().put((self.session.token, key), captured, captured.nbytes,
                          on_evict=lambda k, obj: self._evicted(k, obj))
        return captured

    def _evicted(self, key, captured: CapturedCall) -> None:
        self.keys.discard(key[1])
        captured.release()

    def release(self) -> int:
        token = self.session.token
        dropped = self._cache().release_matching(lambda k: isinstance(k, tuple) and k and k[0] == token)
        self.keys.clear()
        self.pool = None
        return len(dropped)

    @property
    def nbytes(self) -> int:
        cache = self._cache()
        return sum(getattr(cache.get((self.session.token, k)), "nbytes", 0) for k in list(self.keys))

    def check_weights(self, unet, transformer_options: dict) -> None:
        """Once per sampling run: graphs captured over tensors that moved since are dropped (re-captured)."""
        marker = transformer_options.get("sample_sigmas")
        if marker is not None and marker is self.last_run_marker:
            return
        self.last_run_marker = marker
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


class ChannelsLastLayout:
    """Keeps the UNet's convolution weights channels-last, checked once per sampling run before anything is
    compiled or captured (a weight ComfyUI replaced since is converted again)."""

    def __init__(self, notice: Callable):
        self.notice = notice
        self.last_run_marker = None

    def prepare(self, unet, transformer_options: dict) -> None:
        marker = transformer_options.get("sample_sigmas")
        if marker is not None and marker is self.last_run_marker:
            return
        self.last_run_marker = marker
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
