"""The WebUI panel → accelerator plan mapping (host-agnostic core), and the shim importing outside the WebUI."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]   # not from tests.conftest: ComfyUI has a `tests` package too

sys.path.insert(0, str(REPO_ROOT))  # as the WebUI shim does: the core is the top-level package `accelerators`

from accelerators import settings as core_settings  # noqa: E402
from accelerators.base import AcceleratorInputError, Availability, BackendUnavailable  # noqa: E402
from accelerators.cfg_cutoff import CFGCutoffConfig  # noqa: E402
from accelerators.options import AUTO_ORDER  # noqa: E402
from accelerators.webui_mapping import infotext_to_panel, panel_to_plan, webui_settings_to_core  # noqa: E402
from accelerators.webui_passes import (cfg_cutoff_sigma, cutoff_step, img2img_sigmas,  # noqa: E402
                                       setup_img2img_steps, taesd_overrides)

DEFAULT = core_settings.Settings()


def availability_of(table):
    """An availability answer like the registry's: None = not installed, else Availability(ok, reason)."""
    return lambda name: table.get(name)


EVERYTHING = availability_of({name: Availability(True, "ok here") for name in
                              ("inductor", "inductor+cudagraphs", "onediff", "stable-fast", "tensorrt")})


def test_disabled_panel_applies_nothing():
    plan = panel_to_plan({"backend": "tensorrt", "deepcache": True}, settings=DEFAULT, availability=EVERYTHING)
    assert plan.steps == [] and plan.infotext() == {}


def test_full_panel_composes_in_design_order():
    plan = panel_to_plan({"enabled": True, "backend": "inductor", "deepcache": True, "deepcache_interval": 4,
                          "cfg_cutoff": True, "cfg_cutoff_percent": 70, "taesd": True},
                         settings=DEFAULT, availability=EVERYTHING)
    assert [s.accelerator for s in plan.steps] == ["cfg_cutoff", "deepcache", "inductor", "taesd"]
    assert plan.step("cfg_cutoff").options == {"cutoff_percent": 70.0, "sigma_threshold": 0.0}
    assert plan.step("deepcache").options == {"cache_interval": 4, "cache_branch": 0}
    backend = plan.step("inductor")
    assert backend.kind == "backend"
    assert {k: backend.options[k] for k in ("dynamic", "fallback")} == {"dynamic": "buckets", "fallback": "eager"}
    assert plan.infotext() == {"Accel backend": "inductor", "Accel CFG cutoff": "70%",
                               "Accel DeepCache": "interval 4, branch 0", "Accel TAESD": "on"}


@pytest.mark.parametrize("values, fragment", [
    ({"backend": "tensorrtx"}, "unknown backend 'tensorrtx'; choose one of: auto, default, inductor"),
    ({"cfg_cutoff_percent": 150}, "cfg_cutoff_percent must be between 0 and 100, got 150"),
    ({"deepcache_interval": 0}, "deepcache_interval must be between 1 and 100, got 0"),
    ({"deepcache_branch": 12}, "deepcache_branch must be between 0 and 11, got 12"),
    ({"deepcache_interval": 2.5}, "deepcache_interval must be a whole number"),
    ({"fallback": "maybe"}, "unknown fallback policy 'maybe'; choose one of: eager, error"),
    ({"enabled": "sometimes"}, "enabled must be on or off"),
    ({"turbo": True}, "unknown accelerator panel field(s): turbo"),
])
def test_bad_panel_values_get_a_clear_message(values, fragment):
    with pytest.raises(AcceleratorInputError) as err:
        panel_to_plan({"enabled": True, **values}, settings=DEFAULT, availability=EVERYTHING)
    assert fragment in str(err.value)


def test_default_is_the_settings_backend_and_auto_the_fastest_here():
    """The one rule of options.py, as the ComfyUI node follows it: the panel's default is `default`."""
    gpu, cpu = Availability(True, "NVIDIA H200"), Availability(False, "no GPU")
    chosen = core_settings.Settings(default_backend="stable-fast")
    plan = panel_to_plan({"enabled": True}, settings=chosen, availability=EVERYTHING, gpu=gpu)
    assert plan.backend == "stable-fast" and "default backend from the settings" in plan.notes[0]
    plan = panel_to_plan({"enabled": True, "backend": "auto"}, settings=chosen, availability=EVERYTHING, gpu=gpu)
    assert plan.backend == AUTO_ORDER[0]   # auto does not read the settings

    only_inductor = availability_of({"inductor": Availability(True, "gcc found"),
                                     "inductor+cudagraphs": Availability(False, "needs a CUDA GPU")})
    plan = panel_to_plan({"enabled": True, "backend": "auto"}, settings=DEFAULT, availability=only_inductor, gpu=gpu)
    assert plan.backend == "inductor" and AUTO_ORDER.index("inductor") > AUTO_ORDER.index("inductor+cudagraphs")
    assert plan.notes[0].startswith("auto picked inductor, the fastest available here (gcc found)")

    plan = panel_to_plan({"enabled": True, "backend": "auto"}, settings=DEFAULT, availability=EVERYTHING, gpu=cpu)
    assert plan.backend == "eager" and plan.steps == [] and plan.notes[0].startswith("auto picked eager")
    plan = panel_to_plan({"enabled": True, "backend": "auto"}, settings=DEFAULT, availability=availability_of({}),
                         gpu=gpu)
    assert plan.backend == "eager" and plan.steps == [] and "no compile backend can run here" in plan.notes[0]


def test_missing_backend_falls_back_or_raises_by_policy():
    no_trt = availability_of({"tensorrt": Availability(False, "tensorrt not installed (pip install tensorrt)")})
    plan = panel_to_plan({"enabled": True, "backend": "tensorrt", "cfg_cutoff": True}, settings=DEFAULT,
                         availability=no_trt)
    assert plan.backend == "eager" and plan.requested_backend == "tensorrt"
    assert [s.accelerator for s in plan.steps] == ["cfg_cutoff"]
    assert plan.notes == ["backend tensorrt is unavailable: tensorrt not installed (pip install tensorrt); running eager"]
    assert plan.infotext()["Accel requested"] == "tensorrt"
    with pytest.raises(BackendUnavailable, match="tensorrt not installed"):
        panel_to_plan({"enabled": True, "backend": "tensorrt", "fallback": "error"}, settings=DEFAULT,
                      availability=no_trt)
    with pytest.raises(BackendUnavailable, match="not part of this install"):
        panel_to_plan({"enabled": True, "backend": "onediff"}, settings=core_settings.Settings(fallback_policy="error"),
                      availability=availability_of({}))


def test_infotext_round_trips_to_the_panel():
    values = {"enabled": True, "backend": "inductor+cudagraphs", "deepcache": True, "deepcache_interval": 5,
              "deepcache_branch": 2, "cfg_cutoff": True, "cfg_cutoff_percent": 65.0, "taesd": False,
              "step_cache": True, "step_cache_mode": "taylor", "step_cache_interval": 4, "step_cache_start": 0.25,
              "step_cache_end": 0.8, "step_cache_max_consecutive": 2}
    plan = panel_to_plan(values, settings=DEFAULT, availability=EVERYTHING)
    back = infotext_to_panel(plan.infotext())
    assert panel_to_plan(back, settings=DEFAULT, availability=EVERYTHING).infotext() == plan.infotext()
    assert back["deepcache_interval"] == 5 and back["cfg_cutoff_percent"] == 65.0
    assert (back["step_cache_mode"], back["step_cache_interval"]) == ("taylor", 4)
    assert (back["step_cache_start"], back["step_cache_end"], back["step_cache_max_consecutive"]) == (0.25, 0.8, 2)
    with pytest.raises(AcceleratorInputError, match="unknown backend 'warp'"):
        infotext_to_panel({"Accel backend": "warp"})
    assert infotext_to_panel({"Steps": 20}) == {}


def test_a_bad_pasted_field_is_reported_once_and_the_others_paste():
    errors = []
    values = infotext_to_panel({"Accel backend": "warp", "Accel CFG cutoff": "40%",
                                "Accel DeepCache": "interval 500, branch 1", "Accel TAESD": "on"}, errors)
    assert values == {"enabled": True, "cfg_cutoff": True, "cfg_cutoff_percent": 40.0, "deepcache": True,
                      "deepcache_branch": 1, "taesd": True, "step_cache": False}
    assert len(errors) == 2 and "unknown backend 'warp'" in errors[0]
    assert "deepcache_interval must be between 1 and 100, got 500" in errors[1]


def test_the_infotext_states_what_ran_not_what_was_asked():
    plan = panel_to_plan({"enabled": True, "backend": "inductor", "deepcache": True, "cfg_cutoff": True,
                          "cfg_cutoff_percent": 50, "taesd": True}, settings=DEFAULT, availability=EVERYTHING)
    ran = {"backend": "eager", "deepcache": False, "cfg_cutoff": True, "taesd": False,
           "notes": ["inductor: compiling failed; running eager", "TAESD not used: taesd_decoder.pth is missing"]}
    assert plan.infotext(ran) == {"Accel backend": "eager", "Accel requested": "inductor", "Accel CFG cutoff": "50%",
                                  "Accel note": "inductor: compiling failed; running eager; TAESD not used: "
                                                "taesd_decoder.pth is missing"}
    long_failure = {**ran, "notes": ["inductor: compiling failed (BackendCompilerFailed:\n" + "x" * 500 + ")"]}
    note = plan.infotext(long_failure)["Accel note"]
    assert "\n" not in note and len(note) < 250
    everything = {"backend": "inductor", "deepcache": True, "cfg_cutoff": True, "taesd": True, "notes": []}
    assert plan.infotext(everything) == plan.infotext()
    pasted = infotext_to_panel(plan.infotext(ran))
    assert pasted["backend"] == "inductor" and pasted["deepcache"] is False and pasted["taesd"] is False


@pytest.mark.parametrize("kind, steps, strength, fix_steps, pass_steps, expected", [
    ("img2img", 6, 0.5, False, None, (6, 3)),      # t_enc = int(0.5 * 6): 3 + 1 steps sampled
    ("img2img-fixed", 6, 0.5, True, None, (12, 5)),  # img2img_fix_steps: exactly 6 steps sampled
    ("hires", 6, 0.5, False, 4, (8, 3)),          # the hires pass always takes the fixed-steps branch
    ("hires-0.7", 6, 0.7, False, 4, (5, 3)),
])
def test_img2img_and_hires_step_arithmetic(kind, steps, strength, fix_steps, pass_steps, expected):
    """A1111's setup_img2img_steps (sd_samplers_common.py:22) and the slice its k-diffusion sampler takes."""
    total, t_enc = setup_img2img_steps(steps, strength, fix_steps, pass_steps)
    assert (total, t_enc) == expected
    schedule = [float(total - i) for i in range(total)] + [0.0]   # descending, with the final 0
    sampled = img2img_sigmas(schedule, total, t_enc)
    assert len(sampled) - 1 == t_enc + 1   # steps this pass runs
    if pass_steps:
        assert len(sampled) - 1 == pass_steps


def test_hires_cutoff_at_half_skips_the_last_half_of_the_hires_steps():
    """The report's case: 4 hires steps at 50 % ran [2, 2, 2, 1]; the skip must start at the pass's step 2."""
    total, t_enc = setup_img2img_steps(6, 0.5, False, 4)
    ramp = torch.linspace(0, 1, total)
    full = torch.cat([(14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7, torch.zeros(1)])
    sampled = img2img_sigmas(full.tolist(), total, t_enc)
    threshold = cfg_cutoff_sigma(sampled, 50)
    batches = [1 if s < threshold else 2 for s in sampled[:-1]]
    assert batches == [2, 2, 1, 1]


@pytest.mark.parametrize("percent", [0, 25, 50, 60, 99, 100])
def test_webui_cutoff_sigma_skips_the_same_steps_as_comfyui(percent):
    """The WebUI skips the uncond when sigma < s_min_uncond; ComfyUI's cutoff decides per step: same steps."""
    sigma_max, sigma_min, steps = 14.6, 0.03, 20
    ramp = torch.linspace(0, 1, steps)
    sigmas = torch.cat([(sigma_max ** (1 / 7) + ramp * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7,
                        torch.zeros(1)])  # a Karras schedule with its final 0, as both hosts build it
    threshold = cfg_cutoff_sigma(sigmas.tolist(), percent)
    comfy = CFGCutoffConfig(cutoff_percent=percent)
    webui_skips = [float(s) < threshold for s in sigmas[:-1]]
    comfy_skips = [comfy.uncond_skipped(s, sigmas) for s in sigmas[:-1]]
    assert webui_skips == comfy_skips
    assert sum(comfy_skips) == steps - round(steps * percent / 100)


def test_each_webui_setting_is_validated_alone():
    mapped = webui_settings_to_core({"accel_cache_folder": " /data/accel ", "accel_cache_budget_gb": "12.5",
                                     "accel_default_backend": "tensorrt", "accel_fallback_policy": "error"})
    assert mapped == {"cache_root": "/data/accel", "errors": {},
                      "settings": {"cache_budget_gb": 12.5, "default_backend": "tensorrt", "fallback_policy": "error"}}
    before = core_settings.as_dict()
    mixed = webui_settings_to_core({"accel_cache_budget_gb": 0, "accel_memory_budget_gb": "lots",
                                    "accel_default_backend": "warp", "accel_turbo": 1,
                                    "accel_fallback_policy": "error", "accel_cache_folder": ""})
    assert mixed["settings"] == {"fallback_policy": "error"} and mixed["cache_root"] is None
    assert "cache_budget_gb must be a number between 0.1" in mixed["errors"]["accel_cache_budget_gb"]
    assert "memory_budget_gb must be a number" in mixed["errors"]["accel_memory_budget_gb"]
    assert "warp" in mixed["errors"]["accel_default_backend"]
    assert "unknown WebUI accelerator setting accel_turbo" in mixed["errors"]["accel_turbo"]
    assert core_settings.as_dict() == before   # validating applies nothing


def test_the_compile_switches_are_webui_settings_too():
    """The compile lane's switches (settings.py) are in the WebUI's settings section as in ComfyUI's; the
    checkbox's bool or a saved on/off word both map, anything else is reported for that key alone."""
    mapped = webui_settings_to_core({"accel_precompile": False, "accel_channels_last": "on"})
    assert mapped["settings"] == {"precompile": False, "channels_last": True} and mapped["errors"] == {}
    bad = webui_settings_to_core({"accel_precompile": "sometimes", "accel_channels_last": False})
    assert bad["settings"] == {"channels_last": False}
    assert "precompile must be on or off" in bad["errors"]["accel_precompile"]


def test_shim_imports_outside_the_webui_and_maps_its_args(capsys):
    """The WebUI loads scripts/*.py by path; without the WebUI the shim still imports and maps its panel."""
    path = REPO_ROOT / "scripts" / "comfy_accel_webui.py"
    spec = importlib.util.spec_from_file_location("comfy_accel_webui_shim", path)
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    assert shim.IN_WEBUI is False
    args = (True, "eager", True, 3, True, 50.0, True)  # the accordion's components, in order
    assert shim.panel_values(args)["cfg_cutoff_percent"] == 50.0
    plan = shim.plan_for(args)
    assert plan.backend == "eager"
    assert [s.accelerator for s in plan.steps] == ["cfg_cutoff", "deepcache", "taesd"]
    with pytest.raises(AcceleratorInputError, match="unknown backend"):
        shim.plan_for((True, "warp", False, 3, False, 50.0, False))
    # the console gets a TensorRT build's phases as they come (TensorRT's progress monitor → events.progress)
    shim._console_listener("accel.progress", {"task": "TensorRT build", "value": 2, "total": 5,
                                              "accelerator": "tensorrt", "done": False, "message": "Building engine"})
    shim._console_listener("accel.progress", {"task": "compile", "value": 1, "total": 5, "accelerator": "inductor",
                                              "done": False, "message": ""})
    assert capsys.readouterr().out == "[comfy-accel] tensorrt TensorRT build: Building engine 2/5\n"


def test_step_cache_window_and_most_in_a_row_reach_the_plan_as_on_the_comfyui_node():
    """The panel offers the ComfyUI node's start, end and max_consecutive: into the plan's StepCacheConfig, into the
    infotext in the config's own words, each validated under its panel name."""
    from accelerators.step_cache import StepCacheConfig

    plan = panel_to_plan({"enabled": True, "backend": "eager", "step_cache": True, "step_cache_mode": "interval",
                          "step_cache_interval": 3, "step_cache_start": 0.0, "step_cache_end": 0.5,
                          "step_cache_max_consecutive": 1}, settings=DEFAULT, availability=EVERYTHING)
    options = plan.step("step_cache").options
    assert (options["start"], options["end"], options["max_consecutive"]) == (0.0, 0.5, 1)
    assert StepCacheConfig(**options).window(6) == (0, 3)
    text = plan.infotext({"backend": "eager", "step_cache": "skipped 1 of 6 steps", "notes": []})
    assert text["Accel Step Cache"] == "interval, interval 3, steps 0-0.5, max 1 in a row, skipped 1 of 6 steps"
    for values, fragment in (({"step_cache_start": 1.5}, "step_cache_start must be between 0 and 1"),
                             ({"step_cache_end": -0.1}, "step_cache_end must be between 0 and 1"),
                             ({"step_cache_max_consecutive": 0}, "step_cache_max_consecutive must be between 1"),
                             ({"step_cache_max_consecutive": 1.5}, "step_cache_max_consecutive must be a whole"),
                             ({"step_cache_start": 0.6, "step_cache_end": 0.4}, "end (0.4) must not be below start")):
        with pytest.raises(AcceleratorInputError, match=re.escape(fragment)):
            panel_to_plan({"enabled": True, "step_cache": True, **values}, settings=DEFAULT, availability=EVERYTHING)


def test_a_step_cache_infotext_without_the_window_pastes_the_defaults_and_a_bad_window_alone_is_dropped():
    from accelerators import options

    old = infotext_to_panel({"Accel backend": "eager", "Accel Step Cache": "interval, interval 3, skipped 3 of 6 steps"})
    assert (old["step_cache_start"], old["step_cache_end"], old["step_cache_max_consecutive"]) == \
        (options.STEP_CACHE_START.default, options.STEP_CACHE_END.default, options.STEP_CACHE_MAX_CONSECUTIVE.default)
    errors = []
    bad = infotext_to_panel({"Accel backend": "eager", "Accel Step Cache": "adaptive, threshold 0.3, steps 0.1-7, "
                                                                         "max 4 in a row"}, errors)
    assert (bad["step_cache_threshold"], bad["step_cache_start"], bad["step_cache_max_consecutive"]) == (0.3, 0.1, 4)
    assert "step_cache_end" not in bad and len(errors) == 1 and "step_cache_end must be between 0 and 1" in errors[0]


def test_the_cutoff_step_of_a_pass_and_the_taesd_files_a_job_uses(tmp_path):
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 0.0]
    threshold, first = cutoff_step(sigmas, 60)
    assert first == 3 and 4.0 < threshold < 6.0 and cutoff_step(sigmas, 100) == (0.0, 5)

    sd, sdxl = type("SD", (), {})(), type("SDXL", (), {"is_sdxl": True})()
    overrides, notes = taesd_overrides(tmp_path, sd, is_img2img=False)
    assert overrides == {} and "taesd_decoder.pth is not in" in notes[0] and str(tmp_path) in notes[0]
    (tmp_path / "taesd_decoder.pth").write_bytes(b"")
    assert taesd_overrides(tmp_path, sd, is_img2img=False) == ({"sd_vae_decode_method": "TAESD"}, [])
    overrides, notes = taesd_overrides(tmp_path, sd, is_img2img=True)
    assert overrides == {"sd_vae_decode_method": "TAESD"} and "taesd_encoder.pth is not in" in notes[0]
    (tmp_path / "taesd_encoder.pth").write_bytes(b"")
    assert taesd_overrides(tmp_path, sd, is_img2img=True)[0] == {"sd_vae_decode_method": "TAESD",
                                                                 "sd_vae_encode_method": "TAESD"}
    assert "taesdxl_decoder.pth" in taesd_overrides(tmp_path, sdxl, is_img2img=False)[1][0]
