"""CUDA graphs for the compile lane: one captured call per shape bucket, kept in the process-wide live-object
cache so that ComfyUI unloading the model (or the memory budget) frees them.

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

    def __init__(self, session):  # a compiled_unet.CompileSession: its token names its graphs
        self.session = session
        self.pool = None
        self.keys: set = set()

    def _cache(self):
        from .cache.api import live_objects

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
