"""Running the UNet through a TensorRT engine inside ComfyUI's official hooks.

`attach(model, session)` puts an `EngineUNet` in place of the BaseModel's `diffusion_model` for the duration of
each `apply_model` call, through the compile lane's stand-in swap (`compile/stand_in.py`, key
`comfy_accel.tensorrt`): the host's `_apply_model` still does every input conversion, and `EngineUNet.forward`
either runs the engine or calls the real UNet. It runs the real UNet — eager, with one notice naming the
reason, or an error under the `error` fallback policy — whenever an engine cannot give the host's result
(`unsupported_call_reason`, the compile lane's check with the engine's limits):
  - a ControlNet (`control`), block/attention patches (FreeU's `output_block_patch`, ...), another
    `DIFFUSION_MODEL` wrapper (DeepCache), an extra input the engine lacks;
  - weights a refit cannot express (weight wrappers, scheduled hooks), or a LoRA on an engine without a
    refit map (built elsewhere);
  - a request outside every profile (when on-demand builds are off), TensorRT or CUDA missing.

The engine's real device memory is reported to ComfyUI's memory manager through an additional model
(`residency.Residency`, shared with the fp8 copies): a ModelPatcher without weights whose size is the engines',
loaded with the UNet; when ComfyUI unloads it to make room, the engines are released, and reloaded from the
cache on next use.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable

from .. import events
from ..base import BackendUnavailable
from ..residency import Residency
from ..compile.stand_in import FastPathLimits, attach_stand_in, unservable_reason
from . import refit as refit_mod
from .profiles import (EngineProfile, describe_request, envelope, profile_for_request, request_of, select_profile,
                       validate_profiles)

log = logging.getLogger("comfy_accel")
ACCELERATOR = "tensorrt"
WRAPPER_KEY = "comfy_accel.tensorrt"
RESIDENCY_KEY = "comfy_accel.tensorrt"
# what a baked engine cannot honour: the engine's inputs are x, timesteps, context and (SDXL) y
ENGINE_LIMITS = FastPathLimits(control="its residuals are not engine inputs",
                               patch="cannot run inside a baked engine", served_kwargs=frozenset({"y"}),
                               wrapped="whose step logic a baked engine skips")


def unsupported_call_reason(control, transformer_options: dict | None, kwargs: dict) -> str:
    """Why this UNet call must run eager under a baked engine ('' when the engine can serve it)."""
    return unservable_reason(ENGINE_LIMITS, control, transformer_options, kwargs)


# ---- one accelerated model's engines ------------------------------------------------------------------------
@dataclass
class EngineRecord:
    """An engine this session can use: where it comes from and, once loaded, the live engine."""
    source: str                         # cache entry id or file path
    profiles: list[EngineProfile]
    refit_map: refit_mod.RefitMap | None
    load_plan: Callable[[], bytes]
    engine: object = None               # engine.TensorRTEngine when loaded
    state: refit_mod.RefitState = field(default_factory=refit_mod.RefitState)


@dataclass
class TensorRTOptions:
    fallback: str = "eager"
    node_id: str | None = None
    profiles: list | None = None            # explicit profiles for on-demand builds
    preset: str | None = None               # or a preset name
    dynamic: str = "buckets"                # on-demand builds: "static" at the request, else ranges around it
    build_on_demand: bool = True
    optimization_level: int = 3


class TensorRTSession:
    """Engines for one accelerated model (shared by its clones, e.g. a LoRA loaded after the node)."""

    def __init__(self, options: TensorRTOptions, get_store: Callable | None = None,
                 engines: list[EngineRecord] | None = None, builder: Callable | None = None,
                 engine_loader: Callable | None = None, check_available: Callable | None = None):
        self.options = options
        self.get_store = get_store
        self.records: list[EngineRecord] = list(engines or [])
        self.builder = builder            # (session, patcher, unet, profiles) -> EngineRecord
        # (plan bytes, profiles, device) -> engine; TensorRTEngine.load unless a test runs another runtime
        self.engine_loader = engine_loader
        self.check_available = check_available or _availability
        self.lock = threading.RLock()
        self.residency = Residency(self.release_engines, RESIDENCY_KEY)
        self.failed_builds: dict[str, str] = {}
        # dedupes this session's notices; not id(self), which a later session can reuse after this one is freed
        self.token = uuid.uuid4().hex

    # -- fallback ----------------------------------------------------------------------------------------
    def fallback(self, reason: str, run_eager: Callable):
        if self.options.fallback == "error":
            raise BackendUnavailable(f"tensorrt: {reason}")
        events.notice(ACCELERATOR, f"{reason}; running eager", once_key=f"{ACCELERATOR}:{self.token}:{reason}",
                      node_id=self.options.node_id)
        return run_eager()

    # -- engines -----------------------------------------------------------------------------------------
    def release_engines(self) -> None:
        with self.lock:
            for record in self.records:
                if record.engine is not None:
                    record.engine.release()
                    record.engine = None
                    record.state.reset()   # a reloaded plan holds the base weights again

    def live_bytes(self) -> int:
        return sum(r.engine.nbytes for r in self.records if r.engine is not None)

    def find(self, request: dict):
        """(record, profile index, '') of the tightest engine profile covering the request, or (None, None, why)."""
        best, reasons = None, []
        for record in self.records:
            index, profile, reason = select_profile(record.profiles, request)
            if index is None:
                reasons.append(reason)
                continue
            if best is None or profile.volume() < best[2].volume():
                best = (record, index, profile)
        if best:
            return best[0], best[1], ""
        if not self.records:
            return None, None, f"no TensorRT engine for this model covers {describe_request(request)} yet"
        return None, None, reasons[0] if len(reasons) == 1 else "; ".join(reasons)

    def profiles_to_build(self, request: dict) -> list[EngineProfile]:
        if self.options.profiles:
            chosen = validate_profiles(self.options.profiles)
        elif self.options.preset:
            from .profiles import preset

            chosen = preset(self.options.preset)
        else:
            chosen = []
        if chosen and select_profile(chosen, request)[0] is not None:
            return chosen
        return profile_for_request(request, dynamic=self.options.dynamic != "static")

    def engine_for(self, request: dict, patcher, unet):
        """(record, profile index, '') ready to run for this request — built or loaded if needed — or a reason."""
        with self.lock:
            record, index, reason = self.find(request)
            if record is None:
                if not self.options.build_on_demand or self.builder is None:
                    return None, None, reason + " (build one with the Build TensorRT Engine node)"
                profiles = self.profiles_to_build(request)
                build_id = json.dumps([p.as_dict() for p in profiles], sort_keys=True)
                if build_id in self.failed_builds:
                    return None, None, self.failed_builds[build_id]
                events.notice(ACCELERATOR, f"building an engine for {envelope_text(profiles)} "
                              f"(first use; takes minutes, then cached)", level="info", node_id=self.options.node_id)
                try:
                    record = self.builder(self, patcher, unet, profiles)
                except BackendUnavailable as exc:
                    self.failed_builds[build_id] = str(exc)
                    return None, None, str(exc)
                self.records.append(record)
                index, _, reason = select_profile(record.profiles, request)
                if index is None:
                    return None, None, reason
            if record.engine is None:
                loader = self.engine_loader
                if loader is None:
                    from .engine import TensorRTEngine

                    loader = TensorRTEngine.load
                record.engine = loader(record.load_plan(), record.profiles, device=_device_of(unet))
                record.profiles = record.engine.profiles
                self.residency.set_bytes(self.live_bytes())
            return record, index, ""

    def sync_weights(self, record: EngineRecord, patcher) -> str:
        """Refits the engine to the patcher's live weights; returns a reason when it cannot."""
        why = refit_mod.unsupported_weight_changes(patcher)
        if why:
            return why
        if record.refit_map is None:
            if refit_mod.patched_keys(patcher):
                return (f"the engine {record.source} has no refit map (built elsewhere), so the model's LoRA/"
                        f"weight patches cannot be applied to it")
            return ""
        desired = refit_mod.desired_state(record.refit_map, patcher)
        changed, restore = record.state.plan(desired)
        if not changed and not restore:
            return ""
        if not record.engine.refittable:
            return f"the engine {record.source} was built without REFIT, so LoRA cannot be applied to it"
        dtype = {n: record.engine.input_dtype(n) for n in record.engine.input_names}.get("x")
        device = record.engine.device
        values = refit_mod.live_weights(patcher, changed | restore, record.refit_map, dtype=dtype, device=device)
        record.engine.refit(values, lambda missing: refit_mod.live_weights(
            patcher, {n for n in missing if n in record.refit_map.entries}, record.refit_map, dtype=dtype,
            device=device))
        record.state.commit(desired)
        events.notice(ACCELERATOR, f"refitted {len(changed)} weights"
                      + (f", restored {len(restore)} to base" if restore else "") + " (no rebuild)",
                      level="info", node_id=self.options.node_id)
        return ""


def envelope_text(profiles) -> str:
    env = envelope(profiles)
    return (f"batch {env['batch'][0]}..{env['batch'][1]}, {env['width'][0]}..{env['width'][1]}×"
            f"{env['height'][0]}..{env['height'][1]} px, {env['tokens'][0]}..{env['tokens'][1]} tokens")


def _device_of(unet):
    return next(unet.parameters()).device


def _availability():
    from . import available

    return available()


# ---- the UNet stand-in ---------------------------------------------------------------------------------------
def _engine_unet_class():
    import torch

    class EngineUNet(torch.nn.Module):
        """Stands in for `diffusion_model` during one apply_model call: runs the engine or the real UNet."""

        def __init__(self, unet, session: TensorRTSession, patcher, owner):
            super().__init__()
            object.__setattr__(self, "unet", unet)   # not a submodule: the swap must not re-parent the UNet
            object.__setattr__(self, "owner", owner)  # the BaseModel whose diffusion_model this stands in for
            self.session = session
            self.patcher = patcher

        @contextlib.contextmanager
        def real_unet(self):
            """The real UNet back in place while ComfyUI's state_dict is read (weights for refit or build)."""
            self.owner.diffusion_model = self.unet
            try:
                yield
            finally:
                self.owner.diffusion_model = self

        @property
        def dtype(self):
            return self.unet.dtype

        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
            def eager():
                return self.unet(x, timesteps, context=context, y=y, control=control,
                                 transformer_options=transformer_options, **kwargs)

            session = self.session
            ready = session.check_available()
            if not ready:
                return session.fallback(ready.reason, eager)
            reason = unsupported_call_reason(control, transformer_options, kwargs)
            if reason:
                return session.fallback(reason, eager)
            request = request_of(x.shape, context.shape if context is not None else None)
            try:
                with self.real_unet():
                    record, index, reason = session.engine_for(request, self.patcher, self.unet)
                    if record is not None:
                        reason = session.sync_weights(record, self.patcher)
            except BackendUnavailable as exc:   # an engine that fails to load or refit: eager, with the reason
                record, reason = None, str(exc)
            if record is None or reason:
                return session.fallback(reason, eager)
            inputs = {"x": x, "timesteps": timesteps, "context": context}
            if "y" in record.engine.input_names:
                if y is None:
                    return session.fallback("the engine expects an ADM input y (SDXL) but the call has none", eager)
                inputs["y"] = y
            out = record.engine.run(index, inputs)
            return out.to(x.dtype)

    return EngineUNet


def attach(model, session: TensorRTSession):
    """A clone of `model` whose UNet runs through the session's engines (never mutates `model`)."""
    engine_unet = _engine_unet_class()

    def make_stand_in(base_model, unet, patched):
        patcher = getattr(base_model, "current_patcher", None) or patched
        return engine_unet(unet, session, patcher, base_model)

    patched = attach_stand_in(model, WRAPPER_KEY, make_stand_in, session)
    patched.set_additional_models(RESIDENCY_KEY, [session.residency.patcher(model.load_device, model.offload_device)])
    return patched


# the engines in the artifact store live in store.py (shared with the WebUI); the names stay importable here
from .store import (ENGINE_FILE, PROFILES_FILE, REFIT_FILE, base_state, build_into_store,  # noqa: E402
                    cached_records, engine_key, record_from_entry, record_from_file)

__all__ = ["EngineRecord", "TensorRTOptions", "TensorRTSession", "attach", "unsupported_call_reason",
           "ENGINE_FILE", "PROFILES_FILE", "REFIT_FILE", "base_state", "build_into_store", "cached_records",
           "engine_key", "record_from_entry", "record_from_file"]
