"""The WebUI UNet runner of a job's plan: eager, compiled (inductor), TensorRT engines, with or without DeepCache,
kept across jobs so that compiled code and engines are reused.

Host-agnostic: the WebUI shim (scripts/comfy_accel_webui.py) passes in what it takes from the WebUI: the UNet, its
unpatched forward (`sd_hijack.ldm_original_forward`/`sgm_original_forward`), the UNet module's `timestep_embedding`
and `cat`, the model family and the artifact store; and A1111's LoRA function for `apply_layer_weights`.
"""
from __future__ import annotations

from typing import Callable

from . import events
from .base import BackendUnavailable
from .webui_mapping import AccelPlan


def runner_key(plan: AccelPlan) -> tuple:
    """What a runner is made for: the backend, DeepCache's (interval, branch) and the backend's options."""
    deep = plan.step("deepcache")
    backend = plan.step(plan.backend) if plan.backend != "eager" else None
    deepcache = (deep.options["cache_interval"], deep.options["cache_branch"]) if deep else None
    backend_options = {k: backend.options[k] for k in ("dynamic", "fallback", "precision")} if backend else {}
    return plan.backend, deepcache, tuple(sorted(backend_options.items()))


class RunnerCache:
    """The runner of the model now loaded, by plan: one model at a time (a checkpoint switch frees the old UNet's
    compiled code)."""

    def __init__(self):
        self.runners: dict = {}   # runner_key(plan) → WebUIUNetRunner or WebUITensorRTRunner

    def runner_for(self, plan: AccelPlan, unet, host_forward: Callable, timestep_embedding: Callable, cat: Callable,
                   family: str, get_store: Callable):
        """The runner of `plan` for `unet`. A backend that cannot serve it (or a UNet whose blocks cannot be walked)
        raises BackendUnavailable under fallback `error`; otherwise the runner runs eager and says why in its notes
        and as a notice."""
        from .webui_unet import WebUIUNetRunner, ldm_model_config, make_session

        key = runner_key(plan)
        runner = self.runners.get(key)
        if runner is not None and runner.unet is unet:
            return runner
        _, deepcache, backend_options = key
        backend_options = dict(backend_options)
        session, engines, fallback_note = None, None, ""
        if plan.backend != "eager":
            try:
                if plan.backend == "tensorrt":
                    from .tensorrt.webui import a1111_tensorrt_session

                    engines = a1111_tensorrt_session(unet, backend_options, host_forward, family, deepcache,
                                                     get_store=get_store)
                else:
                    session = make_session(plan.backend, backend_options, ldm_model_config(unet, family),
                                           get_store=get_store)
            except BackendUnavailable as exc:
                if plan.fallback == "error":
                    raise
                fallback_note = f"{exc}; running eager"
        try:
            if engines is not None:
                from .tensorrt.webui import WebUITensorRTRunner

                runner = WebUITensorRTRunner(unet, host_forward, engines)
            else:
                runner = WebUIUNetRunner(unet, host_forward, timestep_embedding, cat, deepcache=deepcache,
                                         session=session)
        except ValueError as exc:   # a UNet whose blocks the runner cannot walk
            if plan.fallback == "error":
                raise BackendUnavailable(str(exc)) from None
            fallback_note = f"{exc}: running the WebUI's own UNet, eager"
            runner = WebUIUNetRunner(unet, host_forward, timestep_embedding, cat)
        if fallback_note:
            runner.notes.append(fallback_note)
            events.notice("webui", fallback_note, once_key=f"webui:{fallback_note}")
        self.runners.clear()
        self.runners[key] = runner
        return runner


def apply_layer_weights(unet, apply: Callable) -> None:
    """Calls A1111's `networks.network_apply_weights` on every layer kind its LoRA patches. A1111 does that lazily,
    in place, from inside each layer's forward; traced by the compiler that in-place copy fails the compile. Done
    before the compiled UNet runs, the layers then find their weights current and only their check is traced."""
    import torch

    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, kinds):
                apply(module)
