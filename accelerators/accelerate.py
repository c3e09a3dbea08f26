"""What the "Accelerate Model" node (and any caller naming a backend) does: pick the backend, validate the
options, apply it — or run eager with the reason when it cannot run here (a shared workflow never fails
because its receiver lacks a backend, unless the fallback policy says `error`).

Backends: `auto` (the fastest available here: AUTO_ORDER), `default` (the settings' default backend), one by
name, or `eager` (nothing: handy for A/B in one workflow).
"""
from __future__ import annotations

from . import events, registry
from . import settings as settings_module
from .base import AcceleratorInputError, BackendUnavailable
from .compile.session import DYNAMIC, FALLBACKS, MODES
from .webui_mapping import AUTO_ORDER, BACKEND_NAMES

NODE_BACKENDS = ("auto", "default", *BACKEND_NAMES, "eager")
NAME = "accelerate_model"


def resolve_backend(requested: str) -> tuple[str, str]:
    """(backend, note): `default` → the settings' backend, `auto` → the first available of AUTO_ORDER."""
    if requested not in NODE_BACKENDS:
        raise AcceleratorInputError(f"unknown backend {requested!r}; choose one of: {', '.join(NODE_BACKENDS)}")
    note = ""
    if requested == "default":
        requested = settings_module.get_settings().default_backend
        note = f"default backend from the settings: {requested}"
    if requested != "auto":
        return requested, note
    reasons = []
    for name in AUTO_ORDER:
        spec = registry.all_specs().get(name)
        if spec is None:
            continue
        found = spec.available()
        if found:
            return name, f"auto picked {name} ({found.reason})"
        reasons.append(f"{name}: {found.reason}")
    return "eager", "auto: no compile backend can run here (" + "; ".join(reasons) + ")"


def validate_options(mode: str, dynamic: str, fallback: str) -> str:
    """Checks the shared options; returns the fallback policy in effect ('default' → the settings')."""
    if mode not in MODES:
        raise AcceleratorInputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if dynamic not in DYNAMIC:
        raise AcceleratorInputError(f"dynamic must be one of {', '.join(DYNAMIC)}; got {dynamic!r}")
    if fallback == "default":
        fallback = settings_module.get_settings().fallback_policy
    if fallback not in FALLBACKS:
        raise AcceleratorInputError(f"fallback must be 'default', 'eager' or 'error'; got {fallback!r}")
    return fallback


def accelerate(model, backend: str = "auto", mode: str = "default", dynamic: str = "buckets",
               fallback: str = "default", node_id=None, get_store=None, keep_weights_on_gpu: bool = False):
    """(accelerated clone, settings in effect). The settings say which backend was chosen and why."""
    fallback = validate_options(mode, dynamic, fallback)
    if not isinstance(keep_weights_on_gpu, bool):
        raise AcceleratorInputError(f"keep_weights_on_gpu must be true or false; got {keep_weights_on_gpu!r}")
    chosen, note = resolve_backend(backend)
    node = None if node_id is None else str(node_id)
    if note:
        events.notice(NAME, note, level="info", node_id=node)
    in_effect = {"backend": chosen, "requested": backend, "mode": mode, "dynamic": dynamic, "fallback": fallback}
    if note:
        in_effect["note"] = note
    if chosen == "eager":
        if backend != "eager" and fallback == "error":  # auto/default found nothing that can run here
            raise BackendUnavailable(note or "no backend chosen")
        out = model.clone()
    else:
        spec = registry.get(chosen)
        options = {"mode": mode, "dynamic": dynamic, "fallback": fallback, "node_id": node, "get_store": get_store}
        ready = spec.available()
        if not ready:
            in_effect["unavailable"] = ready.reason
        out = spec.apply(model, options)
        compiled = what_is_compiled(out)
        if compiled:
            in_effect["compiles"] = compiled
    if keep_weights_on_gpu:
        in_effect["keep_weights_on_gpu"] = keep_on_load_device(out)
        events.notice(NAME, in_effect["keep_weights_on_gpu"], level="info", node_id=node)
    return out, in_effect


def keep_on_load_device(model) -> str:
    """Makes ComfyUI keep this model's weights on the device it runs on (what its --highvram does for every
    model, here for this one) and patch LoRAs into them in place (its `weight_inplace_update`); clones made after
    this node, e.g. by a LoRA loader, inherit both. ComfyUI then neither moves the whole UNet to the CPU and back
    on a LoRA change (≈1.5 s for SD1.5 on an H100) nor swaps in new weight tensors, so the CUDA graphs keep their
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
