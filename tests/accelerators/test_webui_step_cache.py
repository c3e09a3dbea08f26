"""accelerators/webui_step_cache.py: Step Cache on an ldm-layout UNet as the WebUI's SdUnet calls it (CPU, the
tiny SD1.5's real UNetModel through the WebUI runner), the panel → plan → infotext round trip and the job's
report. tests/scripts/test_webui_real.py runs it inside A1111."""
import pytest
import torch

from accelerators.step_cache import StepCacheConfig
from accelerators.webui_step_cache import UNetStepCache
from accelerators.webui_unet import WebUIUNetRunner


@pytest.fixture(scope="module")
def runner(tiny_sd15):
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    unet = tiny_sd15.model.diffusion_model.eval()
    return WebUIUNetRunner(unet, lambda module, *a: type(module).forward(module, *a), timestep_embedding, torch.cat)


def unet_inputs(call: int, batch: int = 2):
    g = torch.Generator().manual_seed(call)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 900.0 - 100 * call),
            torch.randn(batch, 77, 64, generator=g))


def sample_pass(cache, runner, calls: int, batches=None, schedule=None):
    """One sampling pass as A1111 drives it: begin the pass (its sigmas: one per call unless given), then per
    denoiser call `at_call` and the UNet call."""
    runner.reset_counts()
    cache.begin_pass(schedule or [1.0 - n / calls for n in range(calls + 1)])
    outs = []
    with torch.no_grad():
        for call in range(calls):
            runner.begin_call(call)
            cache.at_call(call, calls)
            outs.append(cache(runner, *unet_inputs(call, (batches or [2] * calls)[call])))
    return outs


def interval(n, **kw):
    return StepCacheConfig(cache_mode="interval", interval=n, start=0.0, end=1.0, **kw)


def test_interval_runs_the_unet_on_the_scheduled_calls_and_reuses_its_output(runner):
    cache = UNetStepCache(interval(3))
    outs = sample_pass(cache, runner, 6)
    assert runner.counts.calls == 2   # calls 0 and 3 reached the UNet
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0]) and torch.equal(outs[4], outs[3])
    with torch.no_grad():
        assert torch.equal(outs[3], runner(*unet_inputs(3)))   # a full call is the UNet's own output
    run = cache.summary()
    assert (run["steps"], run["skipped_steps"], run["ran"], run["skipped"]) == (6, 4, 2, 4)
    assert run["line"].startswith("skipped 4 of 6 steps (interval, interval 3")


def test_taylor_extrapolates_and_interval_1_changes_nothing(runner):
    taylor = UNetStepCache(StepCacheConfig(cache_mode="taylor", interval=2, start=0.0, end=1.0))
    outs = sample_pass(taylor, runner, 4)
    assert torch.allclose(outs[3], outs[2] + (outs[2] - outs[0]) / 2, atol=1e-5)   # from calls 0 and 2
    plain = [runner(*unet_inputs(call)) for call in range(4)]
    for out, expected in zip(sample_pass(UNetStepCache(interval(1)), runner, 4), plain):
        assert torch.equal(out, expected)


def test_a_skipped_uncond_starts_its_own_entry_and_a_new_pass_starts_empty(runner):
    """A1111's NGMS drops the uncond rows (batch 2 → 1): the first batch-1 call finds no entry of its own and
    runs; a new pass (hires) keeps nothing from the last."""
    cache = UNetStepCache(interval(3))
    sample_pass(cache, runner, 6, batches=[2, 2, 2, 1, 1, 1])
    assert runner.counts.batches == [2, 1]   # call 0 (batch 2) and call 3 (the first batch 1)
    assert cache.summary()["skipped_steps"] == 4
    sample_pass(cache, runner, 3)
    assert runner.counts.calls == 1 and cache.summary()["steps"] == 9


def test_adaptive_reads_the_schedule_not_the_device_per_call(runner, monkeypatch):
    """On the pass's host sigmas the rule decides with one lagged read per full call; without a schedule of one
    sigma per call (Heun, DDIM) it skips nothing and says so."""
    from accelerators import step_cache

    reads, real = [], step_cache.read_host
    monkeypatch.setattr(step_cache, "read_host", lambda lagged: reads.append(1) or real(lagged))
    schedule = [1.0 - n / 8 for n in range(9)]
    cache = UNetStepCache(StepCacheConfig(threshold=5.0, start=0.0, end=1.0, max_consecutive=2))
    sample_pass(cache, runner, 8, schedule=schedule)
    run = cache.summary()
    assert run["skipped_steps"] > 0 and len(reads) <= run["ran"] - 2
    unscheduled = UNetStepCache(StepCacheConfig(threshold=5.0, start=0.0, end=1.0))
    sample_pass(unscheduled, runner, 8, schedule=schedule[:5])
    assert unscheduled.summary()["skipped_steps"] == 0 and "skipped nothing" in unscheduled.notes[0]
    assert unscheduled.summary()["line"].startswith("skipped 0 of 8 UNet calls")   # calls are not steps here


def test_panel_plan_infotext_and_paste(pack):
    from accelerators.base import AcceleratorInputError, Availability
    from accelerators.settings import Settings
    from accelerators.webui_job import JobState
    from accelerators.webui_mapping import infotext_to_panel, panel_to_plan

    def plan(**values):
        return panel_to_plan({"enabled": True, "backend": "eager", **values}, settings=Settings(),
                             availability=lambda name: Availability(True, "here"), gpu=Availability(False, "cpu"))

    asked = plan(step_cache=True, step_cache_mode="interval", step_cache_interval=3)
    assert asked.step("step_cache").options["interval"] == 3
    job = JobState(asked)
    job.step_cache = UNetStepCache(StepCacheConfig(**asked.step("step_cache").options))
    assert "Accel Step Cache" not in asked.infotext(job.ran())   # nothing ran yet: the image claims nothing
    job.step_cache.steps_seen.update({(1, 0), (1, 1)})
    job.step_cache.steps_run.add((1, 0))
    info = asked.infotext(job.ran())
    assert info["Accel Step Cache"] == "interval, interval 3, steps 0.15-0.95, max 3 in a row, skipped 1 of 2 steps"
    assert infotext_to_panel(info) == {"enabled": True, "backend": "eager", "cfg_cutoff": False, "deepcache": False,
                                       "taesd": False, "step_cache": True, "step_cache_mode": "interval",
                                       "step_cache_interval": 3, "step_cache_start": 0.15, "step_cache_end": 0.95,
                                       "step_cache_max_consecutive": 3}
    assert job.report()["step_cache"]["skipped_steps"] == 1
    for bad, field in (({"step_cache_mode": "teacache"}, "step_cache_mode"), ({"step_cache_interval": 0},
                                                                              "step_cache_interval")):
        with pytest.raises(AcceleratorInputError, match=field):
            plan(step_cache=True, **bad)
    assert plan(step_cache=False, step_cache_mode="teacache").step("step_cache") is None
