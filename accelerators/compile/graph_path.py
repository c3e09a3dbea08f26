"""The compile lane's whole-call CUDA graph path, one for SD UNets and DiTs: which call a graph may replay, what
it carries and its key (`graphs.carry_call`), what it captures, and the replay.

A graph replays the whole diffusion-model call: for an SD UNet the compiled UNet (or its precompiled package),
for a DiT its own forward with every repeated block through the block class's compiled code (`dit.run_blocks`),
the model's Python between the blocks recorded with it. Its key is (shape bucket, patch set, what the call
bakes in: input shapes, non-tensor inputs and transformer options), so Flux's `guidance`, Wan's or LTXV's extra
tensors and a changed `rope_options` never replay a stale graph. LoRA stays safe as for the UNet: weights are
patched in place, and the graphs are re-captured only when ComfyUI moved the weights (`GraphSet.check_weights`).

A DiT's forward runs Python between the blocks that no test of ours has captured on every family; where its
capture fails (a host sync, a copy from pageable memory), this session's DiT calls run compiled without graphs
from then on, with one line saying why.
"""
from __future__ import annotations

from typing import Callable

from .dit import run_blocks
from .fp8 import routing
from .graphs import CarriedCall, carry_call, graph_options, weights_signature


def graph_inputs(x, timesteps, context, y, kwargs: dict, options: dict) -> CarriedCall | str:
    """The call as a graph carries it (`options`: the call's transformer_options without per-run entries), or
    why a graph cannot replay it."""
    carried = carry_call(x, timesteps, {"context": context, "y": y, **kwargs}, options)
    return carried if isinstance(carried, CarriedCall) else f"the call's {carried}"


def graph_key(bucket: tuple, patches: tuple, carried: CarriedCall) -> tuple:
    """One graph per shape bucket, patch set and baked-in inputs."""
    return bucket, patches, carried.signature


def graph_callable(session, unet, bucket: tuple, carried: CarriedCall, options: dict, packaged: bool) -> Callable:
    """What the graph captures, called with `carried.tensors`: the precompiled UNet where there is one (`packaged`
    and a plain UNet call), a DiT's forward with its blocks compiled, else the module compiled by torch.compile."""
    if packaged and carried.plain_unet_call:
        package = session.artifacts.package_or_none(unet, bucket, carried.tensors, options)
        if package is not None:
            return package
    rebuild = carried.rebuild
    if session.by_blocks:
        def blocks(*tensors):
            x_, t_, kwargs = rebuild(tensors)
            with routing(session):
                return run_blocks(session, unet, lambda: unet(x_, t_, transformer_options=dict(options), **kwargs))
        return blocks
    compiled = session.compiled_module(unet)

    def whole(*tensors):
        x_, t_, kwargs = rebuild(tensors)
        with routing(session):
            return compiled(x_, t_, transformer_options=dict(options), **kwargs)
    return whole


def capture(session, unet, key: tuple, carried: CarriedCall, options: dict, packaged: bool):
    """The graph for `key`, captured now; a package that fails its capture is dropped for torch.compile; a DiT
    whose forward cannot be captured turns graphs off for the session (None: run compiled)."""
    from .artifacts import exception_line
    from .session import describe_bucket

    bucket = key[0]
    call = graph_callable(session, unet, bucket, carried, options, packaged)
    try:
        captured = session.graphs.capture(key, call, carried.tensors)
    except Exception as exc:
        if session.artifacts.drop_package(bucket, call, exc):
            captured = session.graphs.capture(key, graph_callable(session, unet, bucket, carried, options, False),
                                              carried.tensors)
        elif session.by_blocks:
            session.graphs.failed = f"capturing {describe_bucket(bucket)} failed ({exception_line(exc)})"
            session.notice(f"CUDA graphs off for this model: {session.graphs.failed}; running compiled",
                           once="graph-capture-failed")
            return None
        else:
            raise
    session.graphs.weights_seen = weights_signature(unet)
    return captured


def replay(session, unet, bucket: tuple, carried: CarriedCall, transformer_options: dict, patches: tuple,
           packaged: bool, run_compiled: Callable):
    """The call replayed from its graph (captured on first use); `run_compiled` where the capture failed."""
    session.graphs.check_weights(unet, transformer_options)
    key = graph_key(bucket, patches, carried)
    captured = session.graphs.get(key)
    if captured is None:
        captured = capture(session, unet, key, carried, graph_options(transformer_options), packaged)
        if captured is None:
            session.calls["compiled"] += 1
            return run_compiled()
    session.calls["graph"] += 1
    if session.fp8 is not None:
        session.fp8.count_replay()
    return captured(*carried.tensors).clone()   # the next replay overwrites the static output
