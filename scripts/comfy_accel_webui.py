"""comfy-accel for the AUTOMATIC1111 WebUI: an always-visible accordion, a settings section and an SdUnet.

The WebUI imports every .py in scripts/ by path, so this file puts the repository root on sys.path and imports the
host-agnostic core as the top-level package `accelerators`; the WebUI's own modules are imported in a guarded block.

What reaches the WebUI's sampling, each through its official hook:
- the panel values → `webui_mapping.AccelPlan` in `before_process`. A1111 swallows exceptions raised there, so a
  bad value is kept and raised where A1111 does not catch it: by the SdUnet (`activate`/`forward`), which every
  enabled job selects; the job then fails with the message;
- backend and DeepCache: the SdUnet ("comfy-accel"), switched in per sampling pass with `sd_unet.apply_unet`
  (the next job's own `apply_unet()` switches back: the user's `sd_unet` setting is never written). It runs the
  UNet through `accelerators.webui_unet.WebUIUNetRunner`: the compile session of the ComfyUI side (shape buckets,
  artifact cache) and DeepCache's block walk;
- CFG cutoff: the WebUI's own uncond skip (NGMS): `p.s_min_uncond` = the sigma of the cutoff step of the schedule
  the pass really samples (img2img and hires through the WebUI's `setup_img2img_steps`);
- Step Cache: the same SdUnet skips whole UNet calls (accelerators/webui_step_cache.py, the step-cache rule of
  the ComfyUI node), told the pass's sigma schedule and A1111's denoiser call count (`on_cfg_denoiser`);
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
                                        cfg_cutoff_sigma, img2img_sigmas, infotext_to_panel, panel_to_plan)
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
_runners: dict = {}          # (backend, deepcache, dynamic, fallback) → WebUIUNetRunner, kept across jobs
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


def taesd_files(is_img2img: bool) -> tuple[Path, list[str], list[str]]:
    """(folder, file names this job needs, the missing ones): the WebUI's own TAESD files, by model family."""
    from modules import paths_internal

    model = shared.sd_model
    prefix = "taesd3" if getattr(model, "is_sd3", False) else "taesdxl" if getattr(model, "is_sdxl", False) \
        else "taesd"
    folder = Path(paths_internal.models_path) / "VAE-taesd"
    needed = [f"{prefix}_decoder.pth"] + ([f"{prefix}_encoder.pth"] if is_img2img else [])
    return folder, needed, [name for name in needed if not (folder / name).is_file()]


def _apply_taesd(p, state: JobState) -> None:
    is_img2img = hasattr(p, "init_images")
    folder, needed, missing = taesd_files(is_img2img)
    decoder, encoder = needed[0], needed[1:]
    if decoder in missing:
        state.note(f"TAESD not used: {decoder} is not in {folder} (put madebyollin/taesd's {', '.join(needed)} "
                   f"there); decoded with the full VAE")
        return
    _override(p, "sd_vae_decode_method", "TAESD")
    state.taesd = True
    if encoder and encoder[0] in missing:
        state.note(f"TAESD encode not used: {encoder[0]} is not in {folder}; encoded with the full VAE")
    elif encoder:
        _override(p, "sd_vae_encode_method", "TAESD")


def _runner_for(state: JobState, unet):
    """The runner of this job's plan for `unet` (kept across jobs: compiled code is reused)."""
    from modules import sd_hijack

    from accelerators.webui_unet import WebUIUNetRunner, ldm_model_config, make_session

    plan = state.plan
    deep = plan.step("deepcache")
    backend = plan.step(plan.backend) if plan.backend != "eager" else None
    deepcache = (deep.options["cache_interval"], deep.options["cache_branch"]) if deep else None
    backend_options = {k: backend.options[k] for k in ("dynamic", "fallback", "precision")} if backend else {}
    key = (plan.backend, deepcache, tuple(sorted(backend_options.items())))
    runner = _runners.get(key)
    if runner is not None and runner.unet is unet:
        return runner
    session, engines, fallback_note = None, None, ""
    host = sys.modules[type(unet).__module__]
    forward = sd_hijack.sgm_original_forward if type(unet).__module__.startswith("sgm") \
        else sd_hijack.ldm_original_forward
    if backend is not None:
        model = shared.sd_model
        family = "sdxl" if getattr(model, "is_sdxl", False) else "sd2" if getattr(model, "is_sd2", False) else "sd1"
        try:
            if plan.backend == "tensorrt":
                from accelerators.tensorrt.webui import a1111_tensorrt_session

                engines = a1111_tensorrt_session(unet, backend_options, forward, family, deepcache,
                                                 get_store=webui_settings.store)
            else:
                session = make_session(plan.backend, backend_options, ldm_model_config(unet, family),
                                       get_store=webui_settings.store)
        except BackendUnavailable as exc:
            if plan.fallback == "error":
                raise
            fallback_note = f"{exc}; running eager"
    cat = host.th.cat if hasattr(host, "th") else __import__("torch").cat
    try:
        if engines is not None:
            from accelerators.tensorrt.webui import WebUITensorRTRunner

            runner = WebUITensorRTRunner(unet, forward, engines)
        else:
            runner = WebUIUNetRunner(unet, forward, host.timestep_embedding, cat, deepcache=deepcache,
                                     session=session)
    except ValueError as exc:   # a UNet whose blocks the runner cannot walk
        if plan.fallback == "error":
            raise BackendUnavailable(str(exc)) from None
        fallback_note = f"{exc}: running the WebUI's own UNet, eager"
        runner = WebUIUNetRunner(unet, forward, host.timestep_embedding, cat)
    if fallback_note:
        runner.notes.append(fallback_note)
        events.notice("webui", fallback_note, once_key=f"webui:{fallback_note}")
    _runners.clear()   # one model at a time: a checkpoint switch frees the old UNet's compiled code
    _runners[key] = runner
    return runner


def _prepare_job_unet():
    """Raises the job's error (where A1111 does not swallow it), else gives the job its runner."""
    global _last_report
    state = _job
    if state.error:
        _last_report = state.report()
        raise RuntimeError(f"comfy-accel: {state.error}")
    unet = shared.sd_model.model.diffusion_model
    if state.runner is None or state.runner.unet is not unet:
        try:
            state.runner = _runner_for(state, unet)
        except (BackendUnavailable, AcceleratorInputError) as exc:
            state.error = str(exc)
            _last_report = state.report()
            raise RuntimeError(f"comfy-accel: {exc}") from None
        state.runner.reset_counts()
        session = state.runner.session
        state.compiles_before = len(session.compiler.compile_events) if session else 0
        state.fp8_calls_before = state.fp8_calls()
        if session is not None or getattr(state.runner, "engines", None) is not None:
            _apply_lora_weights(unet)
    return state.runner


def _apply_lora_weights(unet) -> None:
    """A1111's LoRA patches each layer's weights in place from inside that layer's forward
    (`networks.network_apply_weights`, lazily, once per change). Traced by the compiler, that in-place copy fails
    the compile; so it is done here, before the compiled UNet runs, with the host's own function: inside, the
    layers then find their weights current and only their check is traced."""
    networks = sys.modules.get("networks")   # the built-in Lora extension's module (absent when disabled)
    apply = getattr(networks, "network_apply_weights", None)
    if apply is None or getattr(shared.opts, "lora_functional", False):
        return
    import torch

    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, kinds):
                apply(module)


def _bounds(option_range) -> dict:
    """A slider's bounds: the option's one range (accelerators/options.py)."""
    return {"minimum": option_range.low, "maximum": option_range.high}


def _uses_unet(plan: AccelPlan) -> bool:
    return plan.backend != "eager" or plan.step("deepcache") is not None or plan.step("step_cache") is not None


def _pass_sigmas(p) -> list[float]:
    """The sigma schedule this pass really samples (host floats): img2img and the hires pass start part-way down."""
    from modules import sd_samplers_common

    hires = getattr(p, "is_hr_pass", False)
    if hires or hasattr(p, "init_images"):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, (p.hr_second_pass_steps or p.steps) if hires
                                                              else None)
        return img2img_sigmas(p.sampler.get_sigmas(p, steps), steps, t_enc)
    return [float(s) for s in p.sampler.get_sigmas(p, p.steps)]


def _begin_step_cache_pass(p, state: JobState) -> None:
    """A new pass for the job's step cache, with the pass's sigmas (none: adaptive skips nothing)."""
    state.step_cache.begin_pass(_pass_sigmas(p) if hasattr(p.sampler, "get_sigmas") else None)


def _cutoff_step(p, percent: float):
    """(s_min_uncond, first skipped step) for this pass, from the schedule the pass really samples."""
    sigmas = _pass_sigmas(p)
    threshold = cfg_cutoff_sigma(sigmas, percent)
    first = next((i for i, s in enumerate(sigmas[:-1]) if s < threshold), None)
    return threshold, len(sigmas) - 1 if first is None else first


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
            if not (_job.plan.enabled and _uses_unet(_job.plan)) and not _job.error:
                # selected in the settings for a job that asks for nothing: the WebUI's own forward
                from modules import sd_hijack

                unet = shared.sd_model.model.diffusion_model
                forward = sd_hijack.sgm_original_forward if type(unet).__module__.startswith("sgm") \
                    else sd_hijack.ldm_original_forward
                return forward(unet, x, timesteps, context, *args, **kwargs)
            runner = _prepare_job_unet()
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
            components = [enabled, backend, deepcache, interval, cutoff, cutoff_percent, taesd, *step_cache, precision]
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
            if state.error or _uses_unet(state.plan):
                sd_unet.apply_unet(UNET_LABEL)   # this pass only: the next job's apply_unet() switches back
            if state.runner is not None:
                state.runner.begin_pass()
            if state.step_cache is not None:
                _begin_step_cache_pass(p, state)
            step = state.plan.step("cfg_cutoff")
            if step is None:
                return
            if not hasattr(p.sampler, "get_sigmas"):
                state.cutoff_passes.append(None)
                state.note(f"CFG cutoff not applied: sampler {p.sampler_name} has no sigma schedule")
                return
            p.s_min_uncond, first = _cutoff_step(p, step.options["cutoff_percent"])
            state.cutoff_passes.append(first)

        def post_sample(self, p, ps, *args):
            global _last_report
            state = getattr(p, "comfy_accel_job", None)
            if state is None or not (state.plan.enabled or state.plan.notes):
                return
            p.extra_generation_params.update(state.plan.infotext(state.ran()))
            _last_report = state.report()

    def _step_cache_row(defaults: PanelValues) -> list:
        """Step Cache's components: on/off, the mode, its threshold (adaptive) and interval (interval, taylor)."""
        with gr.Row():
            return [gr.Checkbox(label="Step Cache (skip whole UNet calls; lossy)", value=defaults.step_cache),
                    gr.Dropdown(label="Step Cache mode", choices=list(options.STEP_CACHE_MODES),
                                value=defaults.step_cache_mode),
                    gr.Slider(label="Step Cache threshold (adaptive)", step=0.01,
                              value=defaults.step_cache_threshold, **_bounds(options.STEP_CACHE_THRESHOLD)),
                    gr.Slider(label="Step Cache interval (interval, taylor)", step=1,
                              value=defaults.step_cache_interval, **_bounds(options.STEP_CACHE_INTERVAL))]

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
