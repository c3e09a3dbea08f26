"""What the "Accelerate Model" node (and any caller naming a backend) does: pick the backend, validate the
options, apply it — or run eager with the reason when it cannot run here (a shared workflow never fails
because its receiver lacks a backend, unless the fallback policy says `error`).

Which backend `auto` and `default` mean, and every option's values: options.py (the same rule in both hosts).
"""
from __future__ import annotations

from . import events, options, registry
from .base import AcceleratorInputError, BackendUnavailable

NAME = "accelerate_model"


def accelerate(model, backend: str = options.AUTO, mode: str = "default", dynamic: str = "buckets",
               fallback: str = options.DEFAULT, node_id=None, get_store=None, keep_weights_on_gpu: bool = False,
               scope: str = options.SCOPES[0], precision: str = options.PRECISIONS[0]):
    """(accelerated clone, settings in effect). The settings say which backend was chosen and why; `scope` is
    what one torch.compile covers (options.SCOPES; what ran is in `compiles`); `precision` the linear layers'
    arithmetic (options.PRECISIONS; "precision" in the settings is what the attached session runs, with
    "precision_unavailable" saying why fp8 was not attached)."""
    mode, dynamic, fallback = options.parse_backend_options({"mode": mode, "dynamic": dynamic, "fallback": fallback})
    scope = options.parse_scope(scope)
    precision = options.parse_precision(precision)
    if not isinstance(keep_weights_on_gpu, bool):
        raise AcceleratorInputError(f"keep_weights_on_gpu must be true or false; got {keep_weights_on_gpu!r}")
    choice = options.resolve_backend(backend)
    chosen, note = choice.backend, choice.note
    node = None if node_id is None else str(node_id)
    if note:
        events.notice(NAME, note, level="info", node_id=node)
    in_effect = {"backend": chosen, "requested": backend, "mode": mode, "dynamic": dynamic, "fallback": fallback,
                 "scope": scope}
    if note:
        in_effect["note"] = note
    if chosen == options.EAGER:
        if choice.missing and fallback == "error":  # auto wanted a compile backend and none can run here
            raise BackendUnavailable(choice.missing)
        if choice.missing:
            in_effect["unavailable"] = choice.missing
        out = model.clone()
    else:
        spec = registry.get(chosen)
        asked = f"backend '{backend}'" + (f" (picked {chosen})" if chosen != backend else "")
        backend_options = {"mode": mode, "dynamic": dynamic, "fallback": fallback, "node_id": node,
                           "get_store": get_store, "asked": asked, "scope": scope, "precision": precision}
        ready = spec.available()
        if not ready:
            in_effect["unavailable"] = ready.reason
        with events.collect() as raised:
            try:
                out = spec.apply(model, backend_options)
            except AcceleratorInputError as exc:   # the options are checked above: the lane refuses this model
                out, in_effect["unavailable"] = refused_model(model, exc, asked, fallback, node)
        said = [n["message"] for n in raised if n["level"] == "warning" and n["node"] == node]
        if said and not attached_anything(out, model):   # the lane ran its own fallback: keep its reason
            in_effect["unavailable"] = said[-1].removesuffix("; running eager")
        compiled = what_is_compiled(out)
        if compiled:
            in_effect["compiles"] = compiled
        if precision != options.PRECISIONS[0]:
            in_effect.update(precision_attached(out, precision, raised, node))
    if chosen == options.EAGER and precision != options.PRECISIONS[0]:
        in_effect.update(precision="auto", precision_unavailable="no compile backend runs the model (eager)")
    if keep_weights_on_gpu:
        in_effect["keep_weights_on_gpu"] = keep_on_load_device(out)
        events.notice(NAME, in_effect["keep_weights_on_gpu"], level="info", node_id=node)
    return out, in_effect


def attached_anything(out, model) -> bool:
    """Whether `out` (a clone of `model`) runs anything `model` does not: a wrapper the backend added."""
    def wrappers(patcher) -> set[int]:
        return {id(fn) for fns in (getattr(patcher, "wrappers", {}) or {}).get("apply_model", {}).values()
                for fn in fns}

    return wrappers(out) != wrappers(model)


def refused_model(model, refusal: Exception, asked: str, fallback: str, node: str | None):
    """(the model unaccelerated, the reason) when the chosen backend cannot serve it (a DiT given to a UNet
    lane): one line naming what was asked and the model, or the prompt failed under the `error` policy."""
    reason = str(refusal) if str(refusal).startswith(asked) else f"{asked}: {refusal}"
    if fallback == "error":
        raise AcceleratorInputError(reason) from None
    events.notice(NAME, f"{reason}; running eager", node_id=node)
    return model.clone(), reason


def precision_attached(model, requested: str, raised: list, node) -> dict:
    """{"precision": what the attached compile session runs, "precision_unavailable": why not the requested}."""
    from .compile.stand_in import session_of

    session = session_of(model)
    running = session.options.precision if session is not None else "auto"
    out = {"precision": running}
    if running != requested:
        said = [n["message"] for n in raised if n["accelerator"] == requested and n["node"] == node]
        out["precision_unavailable"] = said[-1].removesuffix("; running in the model's dtype") if said else \
            f"the {'backend' if session is None else 'session'} runs no {requested} path"
    return out


def keep_on_load_device(model) -> str:
    """Makes ComfyUI keep this model's weights on the device it runs on (what its --highvram does for every
    model, here for this one) and patch LoRAs into them in place (its `weight_inplace_update`); clones made after
    this node, e.g. by a LoRA loader, inherit both. ComfyUI then neither moves the whole UNet to the CPU and back
    on a LoRA change (docs/benchmarks.md, "LoRA change") nor swaps in new weight tensors, so the CUDA graphs keep their
    addresses and replay at once; in exchange it cannot free this model's VRAM for another model, and a LoRA's
    original weights are backed up on the GPU. Returns one line saying what changed."""
    load, offload = model.load_device, model.offload_device
    model.weight_inplace_update = True   # ModelPatcher's own fields, read by patch/unpatch, copied by clone()
    if load == offload:
        return f"weights already stay on {load} (ComfyUI unloads this model to the same device); LoRAs are " \
               f"patched into them in place"
    model.offload_device = load
    return f"weights stay on {load} between runs and LoRA changes (instead of moving to {offload}), LoRAs " \
           f"patched in place; ComfyUI cannot free their VRAM for other models"


def what_is_compiled(model) -> str:
    """What the compile lane compiles of this MODEL ("the whole UNetModel (SD15)", "Flux block by block (...)"),
    "" where no compile session is attached (eager, TensorRT)."""
    from .compile.stand_in import session_of

    session = session_of(model)
    return session.served.describe() if session is not None and session.served is not None else ""
