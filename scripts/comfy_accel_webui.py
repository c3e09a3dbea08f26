"""comfy-accel for the AUTOMATIC1111 WebUI: an always-visible accordion and a settings section.

The WebUI imports every .py in scripts/ by path, so this file puts the repository root on sys.path and
imports the host-agnostic core as the top-level package `accelerators`; the WebUI's own modules are imported
in a guarded block, so the pieces that need no WebUI (the panel layout, `plan_for`) import anywhere.

What reaches the WebUI's sampling, each through its official hook:
- the panel values become an `accelerators.webui_mapping.AccelPlan` (validated: a bad value stops the job
  with the message) in `before_process`, and its summary goes into the infotext;
- CFG cutoff: the WebUI's own uncond skip (NGMS): `p.s_min_uncond` is set in `process_before_every_sampling`
  to the sigma of the cutoff step of the real schedule (`webui_mapping.cfg_cutoff_sigma`), with the
  per-job override `s_min_uncond_all`;
- TAESD: the per-job override of the WebUI's `sd_vae_decode_method`/`sd_vae_encode_method`;
- backend and DeepCache: an `sd_unet.SdUnetOption` ("comfy-accel") selected by the per-job override of
  `sd_unet`; its SdUnet runs the UNet through the backend module's host-agnostic `webui_unet_runner` when
  the module has one, and otherwise runs eager and says why (the same fallback policy as ComfyUI);
- settings (cache folder, budgets, default backend, fallback policy) go to `accelerators.settings`, the
  same file the ComfyUI panel writes when both hosts share COMFY_ACCEL_CACHE.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from accelerators import events, registry, settings  # noqa: E402
from accelerators.base import AcceleratorInputError, BackendUnavailable  # noqa: E402
from accelerators.webui_mapping import (PANEL_BACKENDS, AccelPlan, PanelValues, cfg_cutoff_sigma,  # noqa: E402
                                        infotext_to_panel, panel_to_plan, webui_settings_to_core)

log = logging.getLogger("comfy_accel")

try:  # only inside the WebUI
    import gradio as gr
    from modules import script_callbacks, scripts, sd_unet, shared
    IN_WEBUI = True
except ImportError:
    gr = script_callbacks = scripts = sd_unet = shared = None
    IN_WEBUI = False

SECTION = ("comfy_accel", "comfy-accel")
UNET_LABEL = "comfy-accel"
# The accordion's components in the order the WebUI passes their values as *args.
PANEL_ORDER = ("enabled", "backend", "deepcache", "deepcache_interval", "cfg_cutoff", "cfg_cutoff_percent", "taesd")
SETTING_KEYS = ("accel_cache_folder", "accel_cache_budget_gb", "accel_memory_budget_gb", "accel_default_backend",
                "accel_fallback_policy")


def panel_values(args) -> dict:
    """The accordion's *args as the dict webui_mapping validates."""
    return dict(zip(PANEL_ORDER, args))


def plan_for(args, store=None) -> AccelPlan:
    return panel_to_plan(panel_values(args), store=store)


def apply_webui_settings(values: dict) -> None:
    """WebUI settings → core settings and cache folder (validated; a bad value is reported and not applied)."""
    mapped = webui_settings_to_core(values)
    if mapped["cache_root"]:
        os.environ["COMFY_ACCEL_CACHE"] = mapped["cache_root"]
    root = _cache_root()
    settings.load(root / "settings.json")
    settings.update(mapped["settings"])


def _cache_root() -> Path:
    from accelerators.cache import resolve_cache_root

    default = Path(getattr(shared.cmd_opts, "data_dir", None) or REPO_ROOT) / "models" / "accel_cache" \
        if shared is not None else REPO_ROOT / "accel_cache"
    return Path(resolve_cache_root(host_default=default))


_store = None
_current_plan = AccelPlan()  # the plan of the job being processed (set in before_process)


def webui_store():
    """The WebUI's ArtifactStore: same format and (with COMFY_ACCEL_CACHE) same folder as ComfyUI's."""
    global _store
    from accelerators.cache import ArtifactStore

    root = _cache_root()
    budget = int(settings.get_settings().cache_budget_gb * 1e9)
    if _store is None or Path(_store.root) != root:
        _store = ArtifactStore(root, budget_bytes=budget)
    _store.budget_bytes = budget
    return _store


def _console_listener(event: str, data: dict) -> None:
    if event == "accel.progress" and data.get("done"):
        print(f"[comfy-accel] {data.get('accelerator') or ''} {data.get('task')}: done {data.get('message') or ''}")


events.add_listener(_console_listener)


@contextlib.contextmanager
def _eager_unet():
    """Lets the SdUnet call the WebUI's own UNet forward without re-entering itself."""
    current = sd_unet.current_unet
    sd_unet.current_unet = None
    try:
        yield
    finally:
        sd_unet.current_unet = current


def _runner_for(plan: AccelPlan, unet):
    """The callable that runs the UNet for this plan: the backend's (and DeepCache's) host-agnostic runner."""
    run = None
    for step in plan.steps:
        if step.kind not in ("backend", "model") or step.accelerator == "cfg_cutoff":
            continue
        module = sys.modules.get(registry.get(step.accelerator).apply.__module__) \
            if step.accelerator in registry.all_specs() else None
        factory = getattr(module, "webui_unet_runner", None)
        if factory is None:
            message = f"{step.accelerator} has no WebUI runner in this version; running eager"
            if plan.fallback == "error":
                raise BackendUnavailable(message)
            events.notice(step.accelerator, message, once_key=f"webui:{step.accelerator}:no-runner")
            continue
        run = factory(unet, dict(step.options, store=webui_store()), inner=run)
    return run


if IN_WEBUI:
    class AccelSdUnet(sd_unet.SdUnet):
        def __init__(self, option):
            super().__init__()
            self.option = option
            self.plan = None
            self.run = None

        def activate(self):
            model = shared.sd_model.model.diffusion_model
            model.to(shared.device)  # apply_unet parked it on the CPU: our runners use its weights
            self.plan = _current_plan
            self.run = _runner_for(self.plan, model)

        def forward(self, x, timesteps, context, *args, **kwargs):
            unet = shared.sd_model.model.diffusion_model
            if self.plan is not _current_plan:  # a later job with other panel values, same SdUnet option
                self.activate()
            with _eager_unet():
                if self.run is None:
                    return unet(x, timesteps, context, *args, **kwargs)
                return self.run(x, timesteps, context, *args, **kwargs)

        def deactivate(self):
            self.run = None

    class AccelUnetOption(sd_unet.SdUnetOption):
        model_name = None
        label = UNET_LABEL

        def create_unet(self):
            return AccelSdUnet(self)

    class AccelScript(scripts.Script):
        def title(self):
            return "comfy-accel"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            defaults = PanelValues()
            tab = "img2img" if is_img2img else "txt2img"
            with gr.Accordion("comfy-accel", open=False, elem_id=f"comfy_accel_{tab}"):
                with gr.Row():
                    enabled = gr.Checkbox(label="Enable", value=defaults.enabled)
                    backend = gr.Dropdown(label="Backend", choices=list(PANEL_BACKENDS), value=defaults.backend)
                with gr.Row():
                    deepcache = gr.Checkbox(label="DeepCache", value=defaults.deepcache)
                    interval = gr.Slider(label="DeepCache interval", minimum=1, maximum=20, step=1,
                                         value=defaults.deepcache_interval)
                with gr.Row():
                    cutoff = gr.Checkbox(label="CFG cutoff", value=defaults.cfg_cutoff)
                    cutoff_percent = gr.Slider(label="Skip the negative prompt from % of steps", minimum=0,
                                               maximum=100, step=1, value=defaults.cfg_cutoff_percent)
                    taesd = gr.Checkbox(label="TAESD decode (fast, lossy)", value=defaults.taesd)
            components = [enabled, backend, deepcache, interval, cutoff, cutoff_percent, taesd]

            def from_infotext(name):
                return lambda params: infotext_to_panel(params).get(name, gr.update())

            self.infotext_fields = [(c, from_infotext(n)) for c, n in zip(components, PANEL_ORDER)]
            self.paste_field_names = []
            return components

        def before_process(self, p, *args):
            try:
                plan = plan_for(args, store=None)
            except (AcceleratorInputError, BackendUnavailable) as exc:
                raise RuntimeError(f"comfy-accel: {exc}") from None  # the WebUI shows it and stops the job
            global _current_plan
            p.comfy_accel_plan = _current_plan = plan
            if not plan.enabled:
                return
            for note in plan.notes:
                events.notice("webui", note, level="info", once_key=f"webui:{note}")
            p.extra_generation_params.update(plan.infotext())
            if plan.step("taesd"):
                p.override_settings["sd_vae_decode_method"] = "TAESD"
                p.override_settings["sd_vae_encode_method"] = "TAESD"
            if any(s.kind == "backend" or s.accelerator == "deepcache" for s in plan.steps):
                p.override_settings["sd_unet"] = UNET_LABEL
            if plan.step("cfg_cutoff"):
                p.override_settings["s_min_uncond_all"] = True

        def process_before_every_sampling(self, p, *args, **kwargs):
            plan = getattr(p, "comfy_accel_plan", None)
            step = plan.step("cfg_cutoff") if plan else None
            if step is None or not hasattr(p.sampler, "get_sigmas"):
                return
            hires = getattr(p, "is_hr_pass", False)
            steps = (getattr(p, "hr_second_pass_steps", 0) or p.steps) if hires else p.steps
            sigmas = [float(s) for s in p.sampler.get_sigmas(p, steps)]
            if hires or hasattr(p, "init_images"):  # img2img and hires start part-way down the schedule
                t_enc = int(min(p.denoising_strength, 0.999) * steps)
                sigmas = sigmas[steps - t_enc - 1:]
            p.s_min_uncond = cfg_cutoff_sigma(sigmas, step.options["cutoff_percent"])

    def on_ui_settings():
        section = SECTION
        current = settings.get_settings()

        def onchange():
            values = {key: getattr(shared.opts, key) for key in SETTING_KEYS}
            try:
                apply_webui_settings(values)
            except AcceleratorInputError as exc:
                print(f"[comfy-accel] setting not applied: {exc}")

        options = {
            "accel_cache_folder": shared.OptionInfo("", "Artifact cache folder (empty: models/accel_cache; "
                                                    "point ComfyUI's COMFY_ACCEL_CACHE at the same folder to share)",
                                                    section=section, onchange=onchange),
            "accel_cache_budget_gb": shared.OptionInfo(current.cache_budget_gb, "Artifact cache budget (GB on disk)",
                                                       gr.Number, section=section, onchange=onchange),
            "accel_memory_budget_gb": shared.OptionInfo(current.memory_budget_gb, "Live compiled objects (GB)",
                                                        gr.Number, section=section, onchange=onchange),
            "accel_default_backend": shared.OptionInfo(current.default_backend, "Default backend ('auto' in the panel)",
                                                       gr.Dropdown, {"choices": list(settings.BACKENDS)},
                                                       section=section, onchange=onchange),
            "accel_fallback_policy": shared.OptionInfo(current.fallback_policy, "When a backend cannot serve a run",
                                                       gr.Radio, {"choices": list(settings.FALLBACK_POLICIES)},
                                                       section=section, onchange=onchange),
        }
        for key, info in options.items():
            shared.opts.add_option(key, info)

    def on_list_unets(unet_list):
        unet_list.append(AccelUnetOption())

    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_list_unets(on_list_unets)
