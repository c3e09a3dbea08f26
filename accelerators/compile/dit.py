"""Which diffusion models the compile lane serves, and how: the SD UNets compiled whole, every DiT (Flux, SD3,
Qwen-Image, Wan, HunyuanVideo, ...) block by block ("regional compile").

A DiT is a short Python forward around lists of identical transformer blocks (Flux: 19 double + 38 single blocks).
Compiling the whole model traces all 57 and compiles each; compiling the block's code once and running every
block of that class through it costs one compile per block class and shape. Dynamo makes one graph serve every
instance of a class because it lifts a module's parameters to graph inputs (`inline_inbuilt_nn_modules`, on by
default since torch 2.5) instead of baking them: the same mechanism core's `set_torch_compile_wrapper(keys=...)`
and KJNodes rely on. Here each block class gets its own compiled function (a copy of `_run_block` under its own
code object, so each class has its own cache and recompile budget), and for the duration of one `apply_model`
call the block lists hold stand-ins that call it; the model's own forward (embeddings, positional encodings,
patches, ControlNet residuals) stays eager and unchanged. LoRA is patched into the block weights in place, which
the compiled code reads as inputs.

`served_model` is the one place that decides what the lane serves.
"""
from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass
from typing import Callable

from ..base import is_sd_unet

from ..options import SCOPES

WHOLE, BLOCKS = SCOPES[1], SCOPES[2]


@dataclass(frozen=True)
class Served:
    scope: str                 # WHOLE, BLOCKS or "" (not served: the reason says why)
    family: str                # the host's model config class, e.g. "Flux"
    model_class: str           # the diffusion model's class, e.g. "Flux", "WanModel"
    blocks: tuple = ()         # ((attribute, block class name, count), ...) compiled block by block
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.scope)

    def describe(self) -> str:
        """What the node reports it compiled."""
        if self.scope == WHOLE:
            return f"the whole {self.model_class} ({self.family})"
        lists = ", ".join(f"{count} {cls}" for _, cls, count in self.blocks)
        return f"{self.family} block by block ({lists}; one compile per block class and shape)"


def _takes_transformer_options(module) -> bool:
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return "transformer_options" in params or any(p.kind in variadic for p in params.values())


def repeated_blocks(diffusion_model) -> list[tuple[str, object]]:
    """The diffusion model's lists of identical transformer blocks, as (attribute, ModuleList): a direct child
    ModuleList whose entries are all one class whose forward takes ComfyUI's `transformer_options` or passes
    on whatever it is given (every transformer block of the host's DiTs does; SD3's JointBlock takes *args and
    **kwargs; helper lists such as HiDream's caption projections do neither)."""
    import torch

    found = []
    for name, child in diffusion_model.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) and len({type(b) for b in child}) == 1 \
                and _takes_transformer_options(child[0]):
            found.append((name, child))
    return found


def served_model(model, backend: str, regional: bool, scope: str = "auto") -> Served:
    """Whether and how `backend` serves this MODEL: SD UNets whole; other diffusion models block by block where
    the backend can (`regional`: torch.compile) and they have repeated transformer blocks, or whole when asked
    (`scope="whole"`); anything else is not served, with the reason naming the model."""
    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    config = getattr(base, "model_config", None)
    family = type(config).__name__ if config is not None else "unknown"
    model_class = type(dm).__name__
    if dm is None:
        return Served("", family, model_class, reason=f"{backend} needs a MODEL (a diffusion model from a loader); "
                                                      f"got {type(model).__name__}")
    if is_sd_unet(dm):
        return Served(WHOLE, family, model_class)
    what = f"this MODEL is {family} ({model_class})"
    if not regional:
        return Served("", family, model_class, reason=f"{backend} serves SD1.x/SD2.x/SDXL UNet models only; {what}")
    if scope == WHOLE:
        return Served(WHOLE, family, model_class)
    lists = repeated_blocks(dm)
    if not lists:
        return Served("", family, model_class, reason=f"{backend} found no repeated transformer blocks to compile "
                                                      f"in {what.removeprefix('this MODEL is ')}")
    return Served(BLOCKS, family, model_class,
                  blocks=tuple((name, type(ml[0]).__name__, len(ml)) for name, ml in lists))


def _run_block(block, *args, **kwargs):
    return block(*args, **kwargs)


def block_function(block_class: type) -> Callable:
    """`_run_block` under a code object of its own for this block class: dynamo keeps its compiled graphs and its
    recompile budget per code object, so each class gets its own."""
    code = _run_block.__code__.replace(co_name=f"compiled_{block_class.__name__}")
    return types.FunctionType(code, _run_block.__globals__, code.co_name)


_stand_in_class = None


def _block_stand_in_class():
    global _stand_in_class
    if _stand_in_class is None:
        import torch

        class CompiledBlock(torch.nn.Module):
            """Stands in for one transformer block during one call: the block through its class's compiled code."""

            def __init__(self, block, compiled: Callable):
                super().__init__()
                object.__setattr__(self, "block", block)   # not a submodule: the block keeps its place and keys
                object.__setattr__(self, "compiled", compiled)

            def forward(self, *args, **kwargs):
                return self.compiled(self.block, *args, **kwargs)

        _stand_in_class = CompiledBlock
    return _stand_in_class


def compiled_block(session, block_class: type) -> Callable:
    """The session's compiled code every block of this class runs through (compiled once per class)."""
    key = ("block", block_class)
    found = session.functions.get(key)
    if found is None:
        with session.lock:
            found = session.functions.get(key)
            if found is None:
                found = session.functions[key] = session.compiled_function(f"block {block_class.__name__}",
                                                                           block_function(block_class))
    return found


def run_blocks(session, unet, call: Callable):
    """`call()` (the model's own forward) with every repeated block running through the session's compiled code."""
    with blocks_compiled(unet, session.served, lambda block_class: compiled_block(session, block_class)):
        return call()


@contextlib.contextmanager
def blocks_compiled(diffusion_model, served: Served, compiled_for: Callable):
    """For the duration of the block: every block of `served.blocks` runs through `compiled_for(block class)`."""
    stand_in = _block_stand_in_class()
    swapped = []
    try:
        for name, _, _ in served.blocks:
            blocks = getattr(diffusion_model, name)
            for index, block in enumerate(blocks):
                if isinstance(block, stand_in):   # nested (a second Accelerate Model): the outer one runs
                    continue
                blocks[index] = stand_in(block, compiled_for(type(block)))
                swapped.append((blocks, index, block))
        yield
    finally:
        for blocks, index, block in swapped:
            blocks[index] = block
