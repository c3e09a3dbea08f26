"""Named UNet segments: the seam between a step cache (DeepCache) and a compiler (the compile lane).

A step cache owns the block loop, so the compile lane cannot compile the whole diffusion model (that
would freeze the loop's step logic into one graph). Instead the cache runs each piece of the UNet through
`run_segment(transformer_options, name, fn, *tensors)`:

- with no compiler installed it is exactly `fn(*tensors)` (eager, no overhead beyond one dict lookup);
- when the compile lane has put a callable under `transformer_options["comfy_accel_segment_compiler"]`,
  it returns `compiler(name, fn, *tensors)`, and the compiler compiles (and, with CUDA graphs, captures)
  each named segment once per shape bucket.

What a segment promises the compiler:
- `fn` is created once per model and reused, so its identity is a stable cache key;
- `fn` is a function of the tensors it is given (the step logic stays outside it); it closes over the
  UNet's modules and reads the current call's `transformer_options` (patches such as FreeU's
  `output_block_patch`, attention replacements) exactly as the host's forward would;
- the same `name` always means the same `fn` for one model.

What the compiler promises back: the tensors it returns stay valid until the end of the current UNet call
(the segments of one call hand tensors to each other). DeepCache copies the deep feature it keeps across
steps when a compiler is installed, so CUDA-graph output buffers may be reused by the next replay.

Segment names are `deepcache.b<branch>.shallow_in|deep|shallow_out`; a compiler should key its cache on
the name, the function's identity and the input shapes (CFG cutoff switches batch 2 → 1 once per run).
"""
from __future__ import annotations

from typing import Any, Callable

COMPILER_KEY = "comfy_accel_segment_compiler"


def segment_compiler(transformer_options: dict | None) -> Callable | None:
    """The compiler installed by the compile lane for this call, or None (eager)."""
    if not transformer_options:
        return None
    return transformer_options.get(COMPILER_KEY)


def run_segment(transformer_options: dict | None, name: str, fn: Callable[..., Any], *tensors):
    """Runs one named UNet segment: `fn(*tensors)`, or through the compile lane's segment compiler."""
    compiler = segment_compiler(transformer_options)
    if compiler is None:
        return fn(*tensors)
    return compiler(name, fn, *tensors)


def install_segment_compiler(model_options: dict, compiler: Callable) -> dict:
    """Puts `compiler(name, fn, *tensors)` where `run_segment` finds it (the model's transformer_options).

    For the compile lane: call on a clone's `model_options`; ComfyUI merges them into every call's
    transformer_options.
    """
    model_options.setdefault("transformer_options", {})[COMPILER_KEY] = compiler
    return model_options
