"""TensorRT engines on the WebUI's UNet (an `ldm`/`sgm` UNetModel, what AUTOMATIC1111 runs): host-agnostic.

The WebUI shim hands in the UNet, the host's own unpatched forward and a context under which the host's attention
is exportable (A1111: its "sdp-no-mem" cross-attention optimization; the chunked ones trace their chunk sizes as
constants). From there it is the ComfyUI face's machinery:

- export: `export.export_onnx` through `LdmExportWrapper`, whose forward(x, timesteps, context[, y]) and
  `diffusion_model` attribute give the same input names and initializer names (`diffusion_model.<checkpoint key>`)
  as ComfyUI's export; so the refit map and the engine key (store.py) are the same on both hosts and an engine
  built by one serves the other;
- build, load, run: `store.build_record`, `loader.TensorRTSession` (profiles, on-demand builds per shape bucket: a
  hires pass at another size is one more engine), `engine.TensorRTEngine`;
- LoRA: A1111 applies LoRA in place (`network_apply_weights`) and keeps the base values on each layer
  (`network_weights_backup`, `network_bias_backup`) with the names of the networks applied
  (`network_current_names`). The key and a fresh export use the base values; a refit sets the engine weights of
  exactly the layers whose applied networks changed since the last refit, from the layers' current weights.

`WebUITensorRTRunner` has the interface of `webui_unet.WebUIUNetRunner` (counts, notes, begin_call, summary), so the
shim and the job report treat both alike; a call the engine cannot serve runs the host's eager UNet, with its
reason in the job's notes (or fails the job under the fallback policy "error").
"""
from __future__ import annotations

import contextlib
from typing import Callable

from .. import events
from ..base import BackendUnavailable
from ..webui_unet import RunCounts
from .loader import TensorRTOptions, TensorRTSession
from .profiles import request_of
from .refit import PREFIX, apply_transform


def export_wrapper_class():
    import torch

    class LdmExportWrapper(torch.nn.Module):
        """forward(x, timesteps, context[, y]) → the host's own UNet forward (no SdUnet, no wrappers)."""

        def __init__(self, unet, host_forward: Callable, takes_y: bool):
            super().__init__()
            self.diffusion_model = unet   # initializer names = ComfyUI's ModelPatcher keys = checkpoint keys
            self.host_forward, self.takes_y = host_forward, takes_y

        def forward(self, x, timesteps, context, y=None):
            return self.host_forward(self.diffusion_model, x, timesteps, context, y=y if self.takes_y else None)

    return LdmExportWrapper


class WebUIWeights:
    """The weights of an A1111 UNet under their engine keys (`diffusion_model.<state-dict name>`)."""

    def __init__(self, unet):
        self.unet = unet

    def _layers(self):
        """(key prefix, layer) of every layer A1111's LoRA may have patched (those carrying its backups)."""
        for name, module in self.unet.named_modules():
            if hasattr(module, "network_current_names") or getattr(module, "network_weights_backup", None) is not None:
                yield PREFIX + (f"{name}." if name else ""), module

    def in_place_base(self) -> dict:
        """{key: base tensor} of the weights a LoRA currently changes in place (A1111's backups)."""
        out = {}
        for prefix, module in self._layers():
            if not getattr(module, "network_current_names", ()):
                continue
            for attr, backup in (("weight", "network_weights_backup"), ("bias", "network_bias_backup")):
                value = getattr(module, backup, None)
                if value is not None and not isinstance(value, (tuple, list)):   # MHA backs up a pair: no SD UNet
                    out[prefix + attr] = value
        return out

    def base(self) -> dict:
        """{key: tensor} of the whole UNet without LoRA: what the engine key fingerprints."""
        state = {PREFIX + k: v for k, v in self.unet.state_dict(keep_vars=True).items()}
        state.update(self.in_place_base())
        return state

    def desired_state(self, refit_map) -> dict:
        """{engine weight name: the networks applied to its layer} for every layer a LoRA changes now."""
        out = {}
        for prefix, module in self._layers():
            names = tuple(getattr(module, "network_current_names", ()) or ())
            if names:
                for name in refit_map.names_for_keys({prefix + "weight", prefix + "bias"}):
                    out[name] = names
        return out

    def live(self, names, refit_map, dtype=None, device=None) -> dict:
        """{engine weight name: the layer's current value (LoRA applied or not) in the engine's layout}."""
        state = self.unet.state_dict()
        out = {}
        for name in names:
            entry = refit_map.entries[name]
            key = entry.key[len(PREFIX):]
            if key not in state:
                raise KeyError(f"the engine's refit map names {entry.key}, which this UNet lacks (another model?)")
            value = state[key].detach().to(device or state[key].device, dtype or state[key].dtype)
            out[name] = apply_transform(value, entry.transform).contiguous()
        return out


def webui_engine_key(unet, profiles, settings, family: str = "unknown", tensorrt_version: str | None = None,
                     device=None):
    """The artifact key of an engine for this WebUI UNet: store.engine_key, as ComfyUI computes it for the same
    checkpoint (`store.comfy_engine_key`)."""
    from ..cache import weights_fingerprint
    from .export import signature_of_unet
    from .store import engine_key

    signature = signature_of_unet(unet, family)
    dtype = "float16" if settings.fp16 else str(next(unet.parameters()).dtype).removeprefix("torch.")
    return engine_key(signature, weights_fingerprint(WebUIWeights(unet).base()), profiles, settings, dtype,
                      tensorrt_version=tensorrt_version, device=device)


class WebUITensorRTSession(TensorRTSession):
    """The engines of one WebUI UNet; weights and LoRA state come from A1111's layers instead of a ModelPatcher."""

    def __init__(self, options: TensorRTOptions, host_forward: Callable, family: str, get_store=None,
                 export_context: Callable = contextlib.nullcontext, on_progress=None, **kwargs):
        super().__init__(options, get_store=get_store, builder=self._build, **kwargs)
        self.host_forward, self.family = host_forward, family
        self.export_context, self.on_progress = export_context, on_progress

    def add_stored(self, unet) -> int:
        """Takes the engines already in the store for this UNet (built by either host); returns how many."""
        from ..cache import weights_fingerprint
        from .export import signature_of_unet
        from .store import records_for

        store = self.get_store() if self.get_store else None
        found = records_for(store, signature_of_unet(unet, self.family).key_fields(),
                            weights_fingerprint(WebUIWeights(unet).base()))
        self.records.extend(found)
        return len(found)

    def _build(self, _session, weights: WebUIWeights, unet, profiles):
        from .engine import BuildSettings
        from .export import export_onnx, signature_of_unet
        from .store import build_record

        settings = BuildSettings(optimization_level=self.options.optimization_level)
        signature = signature_of_unet(unet, self.family)
        key = webui_engine_key(unet, profiles, settings, self.family)

        def export(onnx_dir):
            wrapper = export_wrapper_class()(unet, self.host_forward, bool(signature.adm_channels))
            with self.export_context():
                return export_onnx(unet, onnx_dir, profiles[0], family=self.family,
                                   base_weights=weights.in_place_base(), wrapper=wrapper)

        store = self.get_store() if self.get_store else None
        return build_record(store, key, export, signature, profiles, settings, on_progress=self.on_progress)

    def sync_weights(self, record, weights: WebUIWeights) -> str:
        """Refits the engine to the layers' current weights where their LoRAs changed; a reason when it cannot."""
        desired = weights.desired_state(record.refit_map) if record.refit_map is not None else {}
        if record.refit_map is None:
            return (f"the engine {record.source} has no refit map (built elsewhere), so the LoRA applied to the "
                    f"model cannot be applied to it") if weights.in_place_base() else ""
        changed, restore = record.state.plan(desired)
        if not changed and not restore:
            return ""
        if not record.engine.refittable:
            return f"the engine {record.source} was built without REFIT, so LoRA cannot be applied to it"
        dtype, device = record.engine.input_dtype("x"), record.engine.device
        record.engine.refit(weights.live(changed | restore, record.refit_map, dtype, device),
                            lambda missing: weights.live({n for n in missing if n in record.refit_map.entries},
                                                         record.refit_map, dtype, device))
        record.state.commit(desired)
        events.notice("tensorrt", f"refitted {len(changed)} weights" + (f", restored {len(restore)} to base"
                      if restore else "") + " (no rebuild)", level="info")
        return ""


class WebUITensorRTRunner:
    """Runs one WebUI UNet through its engines, for the SdUnet (the interface of WebUIUNetRunner)."""

    deepcache = False
    session = None   # no compile session: the job report's compile counters do not apply

    def __init__(self, unet, host_forward: Callable, engines: WebUITensorRTSession):
        self.unet, self.host_forward, self.engines = unet, host_forward, engines
        self.weights = WebUIWeights(unet)
        self.counts = RunCounts()
        self.notes: list[str] = []
        self.call_index = None

    def reset_counts(self) -> None:
        self.counts, self.notes, self.call_index = RunCounts(), [], None

    def begin_pass(self) -> None:
        pass

    def begin_call(self, call_index: int) -> None:
        self.call_index = call_index

    def __call__(self, x, timesteps, context, *args, **kwargs):
        y = kwargs.pop("y", args[0] if args else None)
        self.counts.calls += 1
        self.counts.batches.append(int(x.shape[0]))

        def eager():
            return self.host_forward(self.unet, x, timesteps, context, *(() if y is None else (y,)), **kwargs)

        engines = self.engines
        ready = engines.check_available()
        reason = "" if ready else ready.reason
        if not reason and kwargs:
            reason = f"the UNet was called with inputs an engine does not take ({', '.join(sorted(kwargs))})"
        record = None
        if not reason:
            request = request_of(x.shape, context.shape if context is not None else None)
            try:
                record, index, reason = engines.engine_for(request, self.weights, self.unet)
                if record is not None and not reason:
                    reason = engines.sync_weights(record, self.weights)
            except BackendUnavailable as exc:   # an engine that fails to build, load or refit: eager, with why
                record, reason = None, str(exc)
        if not reason and "y" in record.engine.input_names and y is None:
            reason = "the engine expects an ADM input y (SDXL) but the call has none"
        if record is None or reason:
            self.counts.eager += 1
            note = f"tensorrt: {reason}; running eager"
            if note not in self.notes:
                self.notes.append(note)
            return engines.fallback(reason, eager)
        inputs = {"x": x, "timesteps": timesteps, "context": context}
        if "y" in record.engine.input_names:
            inputs["y"] = y
        out = record.engine.run(index, inputs)
        self.counts.compiled += 1
        return out.to(x.dtype)

    def summary(self) -> str:
        c = self.counts
        live = [r.source for r in self.engines.records if r.engine is not None]
        return f"{c.calls} UNet calls; {c.compiled} on a TensorRT engine, {c.eager} eager; engines {live or 'none'}"


def tensorrt_session(unet, options: dict, host_forward: Callable, family: str, get_store=None,
                     export_context: Callable = contextlib.nullcontext, on_progress=None) -> WebUITensorRTSession:
    """The engines of a WebUI UNet for the panel's backend options; raises BackendUnavailable where TensorRT (or
    the onnx exporter it needs) is missing, with what installs it."""
    from ..base import module_available
    from . import available, parse_options

    ready = available()
    if not ready:
        raise BackendUnavailable(f"tensorrt: {ready.reason}")
    if not module_available("onnx"):
        raise BackendUnavailable("tensorrt: the UNet's export needs the onnx package (pip install onnx)")
    session = WebUITensorRTSession(parse_options(options), host_forward, family, get_store=get_store,
                                   export_context=export_context, on_progress=on_progress)
    session.add_stored(unet)
    return session


def a1111_tensorrt_session(unet, options: dict, host_forward: Callable, family: str, deepcache=None, get_store=None):
    """`tensorrt_session` inside AUTOMATIC1111 (the WebUI's modules are imported here, when called from its shim):
    its attention made exportable for the export, the build's progress under the WebUI's progress bar."""
    if deepcache:   # an engine is the whole UNet: DeepCache's partial calls cannot run in it
        raise BackendUnavailable("tensorrt: a TensorRT engine runs the whole UNet, so DeepCache's partial UNet calls "
                                 "cannot use it (choose DeepCache with inductor, or TensorRT alone)")
    return tensorrt_session(unet, options, host_forward, family, get_store=get_store,
                            export_context=a1111_exportable_attention, on_progress=a1111_build_progress)


@contextlib.contextmanager
def a1111_exportable_attention():
    """For the time of the export, A1111's plain scaled-dot-product attention (its official optimization switch;
    the chunked optimizations trace their chunk sizes as constants), then the user's choice again."""
    from modules import sd_hijack, sd_hijack_optimizations

    sd_hijack.model_hijack.apply_optimizations(sd_hijack_optimizations.SdOptimizationSdpNoMem().title())
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations()


def a1111_build_progress(share: float, phase: str) -> None:
    """An engine build's progress as the WebUI's job progress text (and its console line from events.progress)."""
    from modules import shared

    shared.state.textinfo = f"comfy-accel: building a TensorRT engine ({share:.0%}, {phase})"
