"""The fp8 copies of one diffusion model's routed Linears (fp8.py), shared by every compile session on that model,
and what the host's memory manager is told about them.

One set per diffusion model and device (`store_for`): Accelerate Model applied again to the same base model (a
changed input, a second node, the bench's next stack) finds the set the earlier sessions made and routes the same
buffers; it never makes a second one. The copies always hold the quantization of the weights as they are now
(the weights are the base model's, shared by every clone), so whichever session runs brings them up to date.

Lifetime: the sessions own the set (a weak registry finds it; each session adopts it when it is attached); when
the last clone carrying one of them is gone (garbage-collected), the copies are freed with it (nothing process-wide
refers to a session: the live-object cache holds only weak handles of its CUDA graphs). ComfyUI unloading the
model frees them at once (`release`, from the clone's ON_DETACH callback) and every session on the set forgets
them: the next run quantizes again.

ComfyUI's memory manager (the WebUI has none: nothing here asks it there):
  - the copies are a model of their own to it: each set has a `residency.Residency` (one, however many sessions
    route the set) whose weightless holder every accelerated clone carries as an additional model (stand_in.py):
    loaded with the model, its size the copies' bytes (`model_memory()`, `model_loaded_memory()`: updated when
    copies are made or freed; after a release it keeps the last size, the room the next run needs). When ComfyUI
    unloads it to make room (any unload of it, partial too: it has no weights to offload), the copies are freed
    (`unloaded`), every session on the set drops its graphs, and the next run makes them again. A partial
    unload of the model itself (lowvram) frees the copies of the layers it offloaded at the next run (they are
    cast per call then: no longer routed), and the holder's size follows;
  - before new copies are made, `make_room` asks `free_memory` for their bytes, keeping this sampling's models:
    still needed, because the holder is loaded before the first run chooses its layers (its size is 0 then) and
    layers can join the routing later (a lowvram load ending).
"""
from __future__ import annotations

import logging
import weakref
from contextvars import ContextVar
from dataclasses import dataclass

from ..residency import Residency

log = logging.getLogger("comfy_accel")
_sampling: ContextVar = ContextVar("comfy_accel_fp8_sampling", default=None)   # the guider sampling now
_stores: "weakref.WeakValueDictionary[tuple, Fp8Store]" = weakref.WeakValueDictionary()
RESIDENCY_KEY = "comfy_accel.fp8"   # the holder's additional-models and callback key


@dataclass
class Routed:
    """One Linear routed to fp8: where it sits, its stand-in (holding the fp8 buffers) and what it was made from."""
    name: str
    parent: object
    attr: str
    linear: object
    stand_in: object
    made_from: tuple    # (id, data_ptr, WebUI network names) of the weight quantized last

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.stand_in.weight_fp8, self.stand_in.weight_scale))


def weight_state(linear) -> tuple:
    weight = linear.weight
    return id(weight), weight.data_ptr(), getattr(linear, "network_current_names", None)


def store_for(diffusion_model, device) -> "Fp8Store":
    """The one set of fp8 copies of `diffusion_model`'s Linears on `device`, made empty if none lives."""
    key = (id(diffusion_model), str(device))
    store = _stores.get(key)
    if store is None or store.model() is not diffusion_model:   # an id reused by a new model
        store = _stores[key] = Fp8Store(diffusion_model, device)
    return store


def live_stores(diffusion_model=None) -> list["Fp8Store"]:
    """The sets alive now that hold copies (of `diffusion_model`'s layers, or of any model): diagnostics, tests."""
    return [s for s in list(_stores.values()) if s.routes and (diffusion_model is None or s.model() is diffusion_model)]


class Fp8Store:
    def __init__(self, diffusion_model, device):
        import torch

        self.model = weakref.ref(diffusion_model)
        self.device = torch.device(device)
        self.routes: dict[str, Routed] = {}
        self.host_marker = None          # what the host said was patched at the last quantization
        self.patched_keys: set = set()   # layer names patched then (unpatching them changes them again)
        self.hooked: set = set()         # layer names ComfyUI's hook patches held at the last ON_APPLY_HOOKS
        self.users: "weakref.WeakSet" = weakref.WeakSet()   # the sessions' fp8.Fp8Weights routing these buffers
        self.residency = Residency(self.unloaded, RESIDENCY_KEY)   # what ComfyUI's memory manager is told

    @property
    def nbytes(self) -> int:
        return sum(route.nbytes for route in self.routes.values())

    def update(self, base_model, candidates: list, eligible: list) -> int:
        """Bring the copies of `eligible` (name, Linear) up to date with the live weights: new layers quantized
        (after asking the host for room), changed ones quantized again in place; `candidates` of the caller that
        are not eligible now (cast per call by ComfyUI) lose their copies. Returns how many were quantized again."""
        from .fp8 import quantize_rows, stand_in_class

        marker = getattr(base_model, "current_weight_patches_uuid", None)
        patcher = getattr(base_model, "current_patcher", None)
        prefix = "diffusion_model."
        patched_now = {k[len(prefix):].removesuffix(".weight") for k in (getattr(patcher, "patches", None) or {})
                       if k.startswith(prefix) and k.endswith(".weight")}
        names = {n for n, _ in eligible}
        for name, _ in candidates:
            if name not in names:
                self.routes.pop(name, None)
        new = [(n, m) for n, m in eligible if n not in self.routes or self.routes[n].linear is not m]
        if new:
            make_room(base_model, sum(m.in_features * m.out_features + 4 * m.out_features for _, m in new),
                      self.device, holder=self.residency.module)
        diffusion_model = self.model()
        for name, linear in new:
            parent_name, _, attr = name.rpartition(".")
            parent = diffusion_model.get_submodule(parent_name) if parent_name else diffusion_model
            weight_fp8, scale = quantize_rows(linear.weight.detach())
            stand_in = stand_in_class()(linear, weight_fp8, scale.reshape(1, -1).contiguous())
            self.routes[name] = Routed(name, parent, attr, linear, stand_in, weight_state(linear))
        host_changed = marker != self.host_marker
        maybe_patched = patched_now | self.patched_keys
        changed = 0
        fresh = {n for n, _ in new}
        for name, linear in eligible:
            route = self.routes[name]
            if name not in fresh and (route.made_from != weight_state(linear)
                                      or (host_changed and name in maybe_patched)):
                self.quantize_into(route)
                changed += 1
        self.host_marker, self.patched_keys = marker, patched_now
        self.residency.set_bytes(self.nbytes)
        return changed

    def hooks_applied(self, patcher) -> int:
        """ComfyUI applied (or removed) hook patches: the layers they patched before or patch now are quantized
        again, in place. Returns how many."""
        prefix = "diffusion_model."
        hooked = {k[len(prefix):].removesuffix(".weight") for k in (getattr(patcher, "hook_backup", None) or {})
                  if k.startswith(prefix) and k.endswith(".weight")}
        affected = [self.routes[n] for n in (hooked | self.hooked) if n in self.routes]
        self.hooked = hooked
        for route in affected:
            self.quantize_into(route)
        return len(affected)

    @staticmethod
    def quantize_into(route: Routed) -> None:
        from .fp8 import quantize_rows

        weight_fp8, scale = quantize_rows(route.linear.weight.detach())
        route.stand_in.weight_fp8.copy_(weight_fp8)   # same buffers: graphs and compiled code keep reading them
        route.stand_in.weight_scale.copy_(scale.reshape(1, -1))
        route.made_from = weight_state(route.linear)

    def release(self) -> int:
        """ComfyUI unloads the model: the copies freed, every session routing them told (its CUDA graphs read
        their addresses: dropped too). Returns the bytes freed."""
        freed = self.nbytes
        self.routes.clear()
        self.host_marker, self.patched_keys, self.hooked = None, set(), set()
        for user in list(self.users):
            user.forget()
        self.residency.set_bytes(0)
        return freed

    def unloaded(self) -> None:
        """ComfyUI unloaded the copies' holder (the residency's ON_DETACH): freed, and said once."""
        freed = self.release()
        for user in list(self.users):
            if user.say_freed(freed):
                break


def make_room(base_model, nbytes: int, device, holder=None) -> None:
    """Before new fp8 copies are made: ComfyUI's memory manager frees `nbytes` plus its minimum inference memory on
    the device, offloading other models first: never the ones this sampling loaded (every loaded clone of its base
    model, the copies' own holder (module `holder`), and the sampler's `loaded_models`: ControlNets, model
    patches; `sampling` tells which). The WebUI has no such call: nothing happens there."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    in_use = getattr(_sampling.get(), "loaded_models", None) or ()
    ours = [m for m in (base_model, holder) if m is not None]
    keep = [loaded for loaded in list(mm.current_loaded_models)
            if any(getattr(loaded.model, "model", None) is m for m in ours) or any(loaded.model is m for m in in_use)]
    if base_model is None or not keep:   # not loaded by ComfyUI's manager (the WebUI, a bare test): nothing to ask
        return
    try:
        mm.free_memory(nbytes + mm.minimum_inference_memory(), device, keep_loaded=keep)
    except Exception:   # the copies are still made; the allocator says if they do not fit
        log.warning("comfy-accel: ComfyUI could not free memory for the fp8 copies", exc_info=True)


def sampling_wrapper(executor, *args, **kwargs):
    """ComfyUI's OUTER_SAMPLE wrapper: while a sampler runs, `make_room` knows the models it loaded (its guider's
    `loaded_models`) and keeps them loaded."""
    token = _sampling.set(executor.class_obj)
    try:
        return executor(*args, **kwargs)
    finally:
        _sampling.reset(token)
