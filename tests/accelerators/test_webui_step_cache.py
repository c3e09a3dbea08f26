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
    sigma per call and without the model's ᾱ (no sigma at all) it skips nothing and says so."""
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


# ---- the adaptive rule on samplers whose calls are not the schedule's steps (controlled outputs) -----------------
RATE = 0.05   # the controlled UNet output changes by exactly this share of its mean per unit of sigma


def sd_alphas_cumprod():
    """SD's ᾱ: scaled-linear betas (sqrt-linear from 0.00085 to 0.012 over 1000 steps), float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def sigma_at(t: float, alphas) -> float:
    """The test's own sigma of timestep t: log sigma linear between integer timesteps."""
    log_sigmas = 0.5 * torch.log((1.0 - alphas) / alphas)
    low = min(int(t), len(alphas) - 2)
    weight = t - low
    return float(torch.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[low + 1]))


def controlled_pass(cache, carried, call_sigmas, total, **begin):
    """One pass where the UNet output at sigma s is [1 + RATE·s | 1 - RATE·s] (mean 1, so its relative change per
    unit sigma is exactly RATE); each call carries its timestep (`carried`). Returns the calls the UNet ran."""
    ran = []
    cache.begin_pass(**begin)
    for call, (t, sigma) in enumerate(zip(carried, call_sigmas)):
        cache.at_call(call, total)
        half = torch.ones(1, 4, 4, 4)
        cache(lambda x, timesteps, context, c=call, s=sigma: ran.append(c) or torch.cat(
            [half * (1 + RATE * s), half * (1 - RATE * s)]), torch.zeros(2, 4, 4, 4), torch.full((2,), float(t)),
            torch.zeros(2, 77, 8))
    return ran


def rule_skips(sigmas, threshold, max_consecutive):
    """The adaptive rule restated: a call skips when RATE·|sigma of the last full call - sigma| < threshold, once the
    rate is known (read lagged: a full call after the first pair of full calls at two different sigmas), at most
    `max_consecutive` in a row. Refuses a comparison within 0.1 % of the threshold (float rounding could flip it)."""
    skips, fulls, pairs, consecutive = [], [], [], 0
    for sigma in sigmas:
        known = bool(fulls) and any(j < len(fulls) - 1 for j in pairs)
        if known:
            assert abs(RATE * abs(fulls[-1] - sigma) - threshold) > 1e-3 * threshold
        skip = known and consecutive < max_consecutive and RATE * abs(fulls[-1] - sigma) < threshold
        consecutive = consecutive + 1 if skip else 0
        if not skip:
            if fulls and fulls[-1] != sigma:
                pairs.append(len(fulls))
            fulls.append(sigma)
        skips.append(skip)
    return skips


def ddim_calls(steps: int = 20):
    """The timestep of each UNet call of A1111's DDIM at `steps` (its get_timesteps: every 1000//steps, +1)."""
    from accelerators.webui_passes import compvis_call_timesteps

    return compvis_call_timesteps([float(min(t + 1, 999)) for t in range(0, 1000, 1000 // steps)], "ddim")


def test_sigma_of_timestep_follows_the_alphas():
    from accelerators.webui_step_cache import sigma_of_timestep

    alphas = sd_alphas_cumprod()
    table = alphas.tolist()
    for t in (0, 1, 500, 999):
        assert sigma_of_timestep(t, table) == pytest.approx(float(((1 - alphas[t]) / alphas[t]).sqrt()), rel=1e-12)
    between = sigma_of_timestep(400.5, table)   # log-linear: the geometric mean of its neighbours
    assert between == pytest.approx((sigma_of_timestep(400, table) * sigma_of_timestep(401, table)) ** 0.5)
    assert sigma_of_timestep(1500, table) == sigma_of_timestep(999, table) > sigma_of_timestep(998.7, table)


def test_adaptive_decides_ddim_calls_on_the_host_timesteps():
    """DDIM (no sigma schedule): every call's sigma comes from the sampler's timesteps and ᾱ, no device read; the
    calls skipped are exactly those the rule picks."""
    alphas, calls = sd_alphas_cumprod(), ddim_calls(20)
    sigmas = [sigma_at(t, alphas) for t in calls]
    cache = UNetStepCache(StepCacheConfig(threshold=0.05, start=0.0, end=1.0, max_consecutive=3))
    ran = controlled_pass(cache, calls, sigmas, 20, schedule=None, alphas_cumprod=alphas.tolist(),
                          call_timesteps=calls)
    expected = rule_skips(sigmas, 0.05, 3)
    assert 0 < sum(expected) < len(calls) - 3 and not expected[4]   # the threshold, not only the count, decides
    assert [c for c, skip in enumerate(expected) if not skip] == ran
    run = cache.summary()
    assert run["sigma_sources"] == {"schedule": 0, "timesteps": len(calls), "read": 0} and not cache.notes
    assert run["decided"] == len(calls) and f"{len(calls)} decided on their sigma" in run["line"]


def test_adaptive_decides_heun_calls_on_their_own_sigmas():
    """Heun: two calls a step (the second at the next sigma, the last step one), so the schedule does not match the
    calls; each call's sigma comes from the timestep it carries (one read per call). Calls at the sigma of the
    last full call add no change; rates come from full calls at two sigmas."""
    alphas = sd_alphas_cumprod()
    steps = 8
    step_t = [999 - i * 999 / steps for i in range(steps)]   # fractional timesteps, as k-diffusion's
    schedule = [sigma_at(t, alphas) for t in step_t] + [0.0]
    calls = [step_t[0]] + [t for t in step_t[1:] for _ in (0, 1)]   # σ0, σ1, σ1, σ2, σ2, ..., σ7, σ7 (2n - 1)
    sigmas = [sigma_at(t, alphas) for t in calls]
    cache = UNetStepCache(StepCacheConfig(threshold=0.03, start=0.0, end=1.0, max_consecutive=3))
    ran = controlled_pass(cache, calls, sigmas, 2 * steps, schedule=schedule, alphas_cumprod=alphas.tolist())
    expected = rule_skips(sigmas, 0.03, 3)
    assert 0 < sum(expected) < len(calls) - 3 and not expected[3] and expected[4]   # call 4: at call 3's sigma
    assert [c for c, skip in enumerate(expected) if not skip] == ran
    run = cache.summary()
    assert run["sigma_sources"] == {"schedule": 0, "timesteps": 0, "read": len(calls)} and not cache.notes
    assert run["unit"] == "UNet calls" and run["steps"] == len(calls)


def test_interval_and_taylor_ignore_the_sigmas():
    """interval and taylor decide on the call count alone: given ᾱ and the timesteps, they run the same calls and
    read nothing for a sigma."""
    alphas, calls = sd_alphas_cumprod(), ddim_calls(12)
    sigmas = [sigma_at(t, alphas) for t in calls]
    for mode in ("interval", "taylor"):
        config = StepCacheConfig(cache_mode=mode, interval=3, start=0.0, end=1.0)
        plain, told = UNetStepCache(config), UNetStepCache(config)
        plain_ran = controlled_pass(plain, calls, sigmas, 12, schedule=None)
        told_ran = controlled_pass(told, calls, sigmas, 12, schedule=None, alphas_cumprod=alphas.tolist(),
                                   call_timesteps=calls)
        assert told_ran == plain_ran == list(range(0, len(calls), 3))   # a full call every 3rd
        assert told.summary()["decided"] == 0 and "decided" not in told.summary()["line"]
