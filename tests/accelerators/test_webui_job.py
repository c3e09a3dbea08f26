"""The WebUI job bookkeeping (accelerators/webui_job.py) and settings (webui_settings.py), host-agnostic, on the CPU."""
import os

import pytest

from accelerators import settings as core_settings
from accelerators.base import Availability
from accelerators.webui_job import JobState, restorable_override
from accelerators.webui_mapping import infotext_to_panel, panel_to_plan
from accelerators.webui_settings import WebUISettings
from accelerators.webui_unet import RunCounts

EVERYTHING = {name: Availability(True, "ok") for name in ("inductor", "inductor+cudagraphs")}


def plan(**values):
    return panel_to_plan({"enabled": True, **values}, settings=core_settings.Settings(),
                         availability=EVERYTHING.get, gpu=Availability(True, "gpu"))


class FakeRunner:   # only what JobState reads: the counts a WebUIUNetRunner keeps, and no compile session
    def __init__(self, **counts):
        self.counts, self.session = RunCounts(**counts), None

    def summary(self):
        return "summary"


def test_an_override_on_a_fresh_install_is_made_restorable():
    opts_data, overrides = {"sd_vae_decode_method": "Full"}, {}
    restorable_override(opts_data, overrides, "sd_vae_decode_method", "TAESD", current="Full")
    restorable_override(opts_data, overrides, "s_min_uncond_all", True, current=False)
    assert overrides == {"sd_vae_decode_method": "TAESD", "s_min_uncond_all": True}
    # A1111 restores exactly the overridden keys found in opts.data, with these values
    assert {k: opts_data[k] for k in overrides if k in opts_data} == {"sd_vae_decode_method": "Full",
                                                                      "s_min_uncond_all": False}


def test_what_ran_decides_the_infotext():
    job = JobState(plan(backend="inductor", deepcache=True, cfg_cutoff=True, cfg_cutoff_percent=50))
    job.runner = FakeRunner(calls=6, compiled=6, full=2, shallow=4)
    job.cutoff_passes = [3]
    assert job.plan.infotext(job.ran()) == {"Accel backend": "inductor", "Accel CFG cutoff": "50%",
                                            "Accel DeepCache": "interval 3, branch 0"}
    job.runner = FakeRunner(calls=6, compiled=5, eager=1, full=6)   # one call fell back, no call from the cache
    job.cutoff_passes = [3, None]                                 # the hires pass's sampler had no schedule
    job.note("inductor: compiling for batch 1 failed; running eager")
    text = job.plan.infotext(job.ran())
    assert text["Accel backend"] == "eager" and text["Accel requested"] == "inductor"
    assert "Accel DeepCache" not in text and "Accel CFG cutoff" not in text
    assert text["Accel note"] == "inductor: compiling for batch 1 failed; running eager"
    assert infotext_to_panel(text)["backend"] == "inductor"   # paste gives back what was asked
    report = job.report()
    assert report["counts"]["eager"] == 1 and report["ran"]["backend"] == "eager" and report["error"] == ""


def test_a_job_with_a_bad_value_carries_its_error():
    job = JobState(error="unknown backend 'warp'")
    assert job.report()["error"] == "unknown backend 'warp'" and not job.plan.enabled


def test_settings_each_alone_and_the_cache_folder_kept_out_of_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFY_ACCEL_CACHE", raising=False)
    before = core_settings.as_dict()
    try:
        webui = WebUISettings(tmp_path / "default")
        assert webui.cache_root() == tmp_path / "default"
        problems = webui.apply_saved({"accel_cache_folder": str(tmp_path / "chosen"), "accel_cache_budget_gb": "lots",
                                      "accel_memory_budget_gb": 3})
        assert list(problems) == ["accel_cache_budget_gb"] and "must be a number" in problems["accel_cache_budget_gb"]
        assert webui.cache_root() == tmp_path / "chosen" and "COMFY_ACCEL_CACHE" not in os.environ
        assert core_settings.get_settings().memory_budget_gb == 3
        assert webui.store().root == tmp_path / "chosen"
        with pytest.raises(Exception, match="cache_budget_gb must be a number between 0.1"):
            webui.apply("accel_cache_budget_gb", -5)
        assert core_settings.get_settings().memory_budget_gb == 3   # the bad one changed nothing
    finally:
        core_settings.load(None)
        core_settings.update({k: v for k, v in before.items()})
