"""comfy-accel for the AUTOMATIC1111 WebUI: an always-visible accordion, a settings section and an SdUnet.

The WebUI imports every .py in scripts/ by path, so this file puts the repository root on sys.path and imports the
host-agnostic core as the top-level package `accelerators`; the WebUI's own modules are imported in a guarded block.

What reaches the WebUI's sampling, each through its official hook:
- the panel values → `webui_mapping.AccelPlan` in `before_process`. A1111 swallows exceptions raised there, so a
  bad value is kept and raised where A1111 does not catch it: by the SdUnet (`activate`/`forward`), which every
  enabled job selects; the job then fails with the message;
- backend and DeepCache: the SdUnet ("comfy-accel"), switched in per sampling pass with `sd_unet.apply_unet`
  (the next job's own `apply_unet()` switches back: the user's `sd_unet` setting is never written). It runs the
  UNet through the runner `accelerators.webui_runners` makes: the compile session of the ComfyUI side (shape
  buckets, artifact cache), TensorRT engines, DeepCache's block walk;
- CFG cutoff: the WebUI's own uncond skip (NGMS): `p.s_min_uncond` = the sigma of the cutoff step of the schedule
  the pass really samples (img2img and hires through the WebUI's `setup_img2img_steps`; accelerators/webui_passes.py);
- Step Cache: the same SdUnet skips whole UNet calls (accelerators/webui_step_cache.py, the step-cache rule of
  the ComfyUI node), told the pass's sigma schedule (adaptive: also the model's ᾱ and DDIM/PLMS's timesteps) and
  A1111's denoiser call count (`on_cfg_denoiser`);
- TAESD: the WebUI's `sd_vae_decode_method`/`sd_vae_encode_method` when its TAESD files are in models/VAE-taesd;
  otherwise the job runs with the full VAE and says which files are missing where;
- per-job settings overrides are made restorable: A1111 restores only keys already in `opts.data`
  (processing.py: `stored_opts`), so a key not there yet is put there with its current value first;
- the infotext says what ran (post_sample), never only what was asked.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from accelerators import events, options, settings  # noqa: E402
from accelerators.base import AcceleratorInputError, BackendUnavailable  # noqa: E402
from accelerators.webui_job import JobState, restorable_override  # noqa: E402
from accelerators.webui_mapping import (PANEL_BACKENDS, PANEL_ORDER, AccelPlan, PanelValues,  # noqa: E402
                                        infotext_to_panel, panel_to_plan)
from accelerators.webui_passes import (compvis_call_timesteps, cutoff_step, host_floats, pass_sigmas,  # noqa: E402
                                       pass_timesteps, taesd_overrides)
from accelerators.webui_runners import RunnerCache, apply_layer_weights  # noqa: E402
from accelerators.webui_settings import SETTING_KEYS, WebUISettings  # noqa: E402
from accelerators.webui_step_cache import UNetStepCache  # noqa: E402
from accelerators.step_cache import StepCacheConfig  # noqa: E402

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


def panel_values(args) -> dict:
    """The accordion's *args as the dict webui_mapping validates."""
    return dict(zip(PANEL_ORDER, args))


def plan_for(args, store=None) -> AccelPlan:
    return panel_to_plan(panel_values(args), store=store)


_job = JobState()
_last_report: dict = {}
_runners = RunnerCache()     # kept across jobs: compiled code is reused
_data_dir = getattr(getattr(shared, "cmd_opts", None), "data_dir", None) if shared is not None else None
webui_settings = WebUISettings(Path(_data_dir or REPO_ROOT) / "models" / "accel_cache")


# ---- the console ------------------------------------------------------------------------------------------------
def _console_handler() -> None:
    """The WebUI has no handler for the pack's logger: info notices (compiled, cache hit, fell back) go to the
    console like the warnings, once each."""
    if not any(getattr(h, "comfy_accel_console", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.comfy_accel_console = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _console_listener(event: str, data: dict) -> None:
    if event == "accel.progress" and data.get("done"):
        print(f"[comfy-accel] {data.get('accelerator') or ''} {data.get('task')}: done {data.get('message') or ''}")
    elif event == "accel.progress" and data.get("accelerator") == "tensorrt":   # an engine build's phases
        print(f"[comfy-accel] tensorrt {data.get('task')}: {data.get('message')} {data['value']}/{data['total']}")


if IN_WEBUI:   # imported elsewhere (tests), the pack's logging stays as it was
    _console_handler()
    events.add_listener(_console_listener)


# ---- per-job pieces -----------------------------------------------------------------------------------------
def _override(p, key: str, value) -> None:
    restorable_override(shared.opts.data, p.override_settings, key, value, shared.opts.get_default(key))


def _apply_taesd(p, state: JobState) -> None:
    """TAESD through the WebUI's VAE method settings, with its own files (models/VAE-taesd), never a download."""
    from modules import paths_internal

    folder = Path(paths_internal.models_path) / "VAE-taesd"
    overrides, notes = taesd_overrides(folder, shared.sd_model, is_img2img=hasattr(p, "init_images"))
    for note in notes:
        state.note(note)
    for key, value in overrides.items():
        _override(p, key, value)
    state.taesd = bool(overrides)


def _host_forward(unet):
    """The WebUI's own UNet forward, without its SdUnet hook."""
    from modules import sd_hijack

    return sd_hijack.sgm_original_forward if type(unet).__module__.startswith("sgm") else sd_hijack.ldm_original_forward


def _make_runner(plan: AccelPlan, unet):
    """The plan's runner for the WebUI's UNet, from the host's pieces; A1111's LoRA weights applied before compiled
    code (or an engine) runs."""
    host = sys.modules[type(unet).__module__]
    model = shared.sd_model
    family = "sdxl" if getattr(model, "is_sdxl", False) else "sd2" if getattr(model, "is_sd2", False) else "sd1"
    cat = host.th.cat if hasattr(host, "th") else __import__("torch").cat
    runner = _runners.runner_for(plan, unet, _host_forward(unet), host.timestep_embedding, cat, family,
                                 webui_settings.store)
    if runner.session is not None or getattr(runner, "engines", None) is not None:
        _apply_lora_weights(unet)
    return runner


def _apply_lora_weights(unet) -> None:
    """A1111's LoRA (`networks.network_apply_weights` of the built-in Lora extension, absent when disabled) applied
    to every layer now, not lazily inside the compiled forward (webui_runners.apply_layer_weights says why)."""
    apply = getattr(sys.modules.get("networks"), "network_apply_weights", None)
    if apply is not None and not getattr(shared.opts, "lora_functional", False):
        apply_layer_weights(unet, apply)


def _job_runner():
    """The job's runner; its error raised where A1111 does not swallow it (and kept for /comfy-accel/status)."""
    global _last_report
    try:
        return _job.runner_for(shared.sd_model.model.diffusion_model, _make_runner)
    except RuntimeError:
        if _job.error:
            _last_report = _job.report()
        raise


def _pass_sigmas(p) -> list[float]:
    from modules import sd_samplers_common

    return pass_sigmas(p, sd_samplers_common.setup_img2img_steps)


def _begin_step_cache_pass(p, cache: UNetStepCache) -> None:
    """The pass's sigma schedule (k-diffusion samplers); for adaptive also the model's ᾱ and, for DDIM/PLMS, the
    timestep of each call from the sampler's own `get_timesteps` (host lists, read once per pass)."""
    from modules import sd_samplers_common

    schedule = _pass_sigmas(p) if hasattr(p.sampler, "get_sigmas") else None
    if cache.config.cache_mode != "adaptive":
        cache.begin_pass(schedule)
        return
    # SD3's timestep is its flow sigma × 1000, no index into the table A1111 derives from it: no ᾱ, no sigma
    alphas = None if getattr(shared.sd_model, "is_sd3", False) else getattr(shared.sd_model, "alphas_cumprod", None)
    calls = None
    if hasattr(p.sampler, "get_timesteps"):
        sampler = getattr(p.sampler.funcname, "__name__", str(p.sampler.funcname))
        calls = compvis_call_timesteps(pass_timesteps(p, sd_samplers_common.setup_img2img_steps), sampler)
    cache.begin_pass(schedule, host_floats(alphas) if alphas is not None else None, calls)


def _bounds(option_range) -> dict:
    """A slider's bounds: the option's one range (accelerators/options.py)."""
    return {"minimum": option_range.low, "maximum": option_range.high}


if IN_WEBUI:
    class AccelSdUnet(sd_unet.SdUnet):
        def __init__(self, option):
            super().__init__()
            self.option = option

        def activate(self):
            # apply_unet parked the UNet on the CPU; the job's runner is made (or its error raised) on the first
            # call, where A1111 does not swallow exceptions
            shared.sd_model.model.diffusion_model.to(shared.device)

        def forward(self, x, timesteps, context, *args, **kwargs):
            if not (_job.plan.enabled and _job.plan.uses_unet) and not _job.error:
                # selected in the settings for a job that asks for nothing: the WebUI's own forward
                unet = shared.sd_model.model.diffusion_model
                return _host_forward(unet)(unet, x, timesteps, context, *args, **kwargs)
            runner = _job_runner()
            if runner.call_index != _job.call_index:
                runner.begin_call(_job.call_index)
            if _job.step_cache is not None:
                return _job.step_cache(runner, x, timesteps, context, *args, **kwargs)
            return runner(x, timesteps, context, *args, **kwargs)

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
                    interval = gr.Slider(label="DeepCache interval", step=1, value=defaults.deepcache_interval,
                                         **_bounds(options.DEEPCACHE_INTERVAL))
                with gr.Row():
                    cutoff = gr.Checkbox(label="CFG cutoff", value=defaults.cfg_cutoff)
                    cutoff_percent = gr.Slider(label="Skip the negative prompt from % of steps", step=1,
                                               value=defaults.cfg_cutoff_percent,
                                               **_bounds(options.CFG_CUTOFF_PERCENT))
                    taesd = gr.Checkbox(label="TAESD decode (fast, lossy)", value=defaults.taesd)
                precision = gr.Dropdown(label="Precision (fp8: GPUs with fp8 tensor cores, lossy)",
                                        choices=list(options.PRECISIONS), value=defaults.precision)
                step_cache = _step_cache_row(defaults)
            # in PANEL_ORDER: Step Cache's window and most in a row came after precision
            components = [enabled, backend, deepcache, interval, cutoff, cutoff_percent, taesd, *step_cache[:4],
                          precision, *step_cache[4:]]
            self.infotext_fields = [(c, pasted_field(n)) for c, n in zip(components, PANEL_ORDER)]
            self.paste_field_names = []
            return components

        def before_process(self, p, *args):
            global _job
            try:
                plan = plan_for(args)
            except (AcceleratorInputError, BackendUnavailable) as exc:
                # A1111 catches what before_process raises and runs the job anyway: the SdUnet raises it
                _job = p.comfy_accel_job = JobState(error=str(exc))
                print(f"[comfy-accel] {exc}: failing the job")
                return
            _job = p.comfy_accel_job = JobState(plan)
            for note in plan.notes:   # also for a plan left empty (a backend missing here, run eager): say so
                _job.note(note)
            if not plan.enabled:
                return
            if plan.step("taesd"):
                _apply_taesd(p, _job)
            if plan.step("cfg_cutoff"):
                _override(p, "s_min_uncond_all", True)
            if plan.step("step_cache"):
                _job.step_cache = UNetStepCache(StepCacheConfig(**plan.step("step_cache").options))

        def process_before_every_sampling(self, p, *args, **kwargs):
            state = getattr(p, "comfy_accel_job", None)
            if state is None or not (state.plan.enabled or state.error):
                return
            if state.error or state.plan.uses_unet:
                sd_unet.apply_unet(UNET_LABEL)   # this pass only: the next job's apply_unet() switches back
            if state.runner is not None:
                state.runner.begin_pass()
            if state.step_cache is not None:
                _begin_step_cache_pass(p, state.step_cache)
            step = state.plan.step("cfg_cutoff")
            if step is None:
                return
            if not hasattr(p.sampler, "get_sigmas"):
                state.cutoff_passes.append(None)
                state.note(f"CFG cutoff not applied: sampler {p.sampler_name} has no sigma schedule")
                return
            p.s_min_uncond, first = cutoff_step(_pass_sigmas(p), step.options["cutoff_percent"])
            state.cutoff_passes.append(first)

        def post_sample(self, p, ps, *args):
            global _last_report
            state = getattr(p, "comfy_accel_job", None)
            if state is None or not (state.plan.enabled or state.plan.notes):
                return
            p.extra_generation_params.update(state.plan.infotext(state.ran()))
            _last_report = state.report()

    def _step_cache_row(defaults: PanelValues) -> list:
        """Step Cache's components, as the ComfyUI node's inputs: on/off, the mode, its threshold (adaptive) and
        interval (interval, taylor); then the window of the steps it may skip and the most skipped in a row."""
        with gr.Row():
            row = [gr.Checkbox(label="Step Cache (skip whole UNet calls; lossy)", value=defaults.step_cache),
                   gr.Dropdown(label="Step Cache mode", choices=list(options.STEP_CACHE_MODES),
                               value=defaults.step_cache_mode),
                   gr.Slider(label="Step Cache threshold (adaptive)", step=0.01,
                             value=defaults.step_cache_threshold, **_bounds(options.STEP_CACHE_THRESHOLD)),
                   gr.Slider(label="Step Cache interval (interval, taylor)", step=1,
                             value=defaults.step_cache_interval, **_bounds(options.STEP_CACHE_INTERVAL))]
        with gr.Row():
            return row + [gr.Slider(label="Step Cache from (share of the steps)", step=0.01,
                                    value=defaults.step_cache_start, **_bounds(options.STEP_CACHE_START)),
                          gr.Slider(label="Step Cache until (share of the steps)", step=0.01,
                                    value=defaults.step_cache_end, **_bounds(options.STEP_CACHE_END)),
                          gr.Slider(label="Step Cache most skipped in a row", step=1,
                                    value=defaults.step_cache_max_consecutive,
                                    **_bounds(options.STEP_CACHE_MAX_CONSECUTIVE))]

    def pasted_field(name: str):
        """One component's value from pasted infotext; the whole paste is parsed once and its problems reported
        once, and a bad field leaves only its own component unchanged."""
        def read(params):
            if _paste.get("params") is not params:
                errors: list[str] = []
                _paste.update(params=params, values=infotext_to_panel(params, errors))
                for message in errors:
                    print(f"[comfy-accel] {message}; that field was not pasted")
            return _paste["values"].get(name, gr.update())
        return read

    _paste: dict = {}

    def on_cfg_denoiser(params):
        # the denoiser's call count, reset per sampling pass (the runner may not exist yet on the first call)
        _job.call_index = int(getattr(params.denoiser, "step", params.sampling_step) or 0)
        if _job.step_cache is not None:   # A1111's count of the calls this pass makes (steps × evaluations)
            total = getattr(params.denoiser, "total_steps", None) or params.total_sampling_steps
            _job.step_cache.at_call(_job.call_index, total)

    def make_onchange(key: str):
        def onchange():
            try:
                webui_settings.apply(key, getattr(shared.opts, key))
            except AcceleratorInputError as exc:   # A1111 reports it and puts the old value back
                raise RuntimeError(f"[comfy-accel] {key} not changed: {exc}") from None
        return onchange

    def on_ui_settings():
        current = settings.get_settings()

        def option(key, default, label, *component):
            info = shared.OptionInfo(default, label, *component, section=SECTION, onchange=make_onchange(key))
            shared.opts.add_option(key, info)

        option("accel_cache_folder", "", "Artifact cache folder (empty: models/accel_cache; point ComfyUI's "
               "COMFY_ACCEL_CACHE at the same folder to share)")
        option("accel_cache_budget_gb", current.cache_budget_gb, "Artifact cache budget (GB on disk)", gr.Number)
        option("accel_memory_budget_gb", current.memory_budget_gb, "Live compiled objects (GB)", gr.Number)
        option("accel_default_backend", current.default_backend, "Default backend ('auto' in the panel)",
               gr.Dropdown, {"choices": list(options.DEFAULT_BACKEND_CHOICES)})
        option("accel_fallback_policy", current.fallback_policy, "When a backend cannot serve a run", gr.Radio,
               {"choices": list(options.FALLBACKS)})
        option("accel_precompile", current.precompile, "inductor+cudagraphs: store the UNet precompiled, so that a "
               "new process loads it without compiling", gr.Checkbox)
        option("accel_channels_last", current.channels_last, "On a GPU, keep convolution weights channels-last "
               "(values unchanged, faster compiled convolutions)", gr.Checkbox)

    def on_app_started(_demo, app):
        @app.get("/comfy-accel/status")
        def status():
            return {"last_job": _last_report, "settings": settings.as_dict(),
                    "cache_root": str(webui_settings.cache_root()),
                    "notices": events.recent(20)}

    for bad_key in webui_settings.apply_saved({k: v for k, v in shared.opts.data.items() if k in SETTING_KEYS}):
        del shared.opts.data[bad_key]   # the default then shows; a bad saved value would stop the settings page
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_list_unets(lambda unets: unets.append(AccelUnetOption()))
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_app_started(on_app_started)
