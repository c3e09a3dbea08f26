"""Step Cache: the decision rules on feature sequences whose changes the test sets, then the real ComfyUI sampler
with the tiny SD1.5 and tiny DiTs: exactness where nothing may be skipped, the model calls that actually ran,
CFG Cutoff's batch change, the compile lane (dynamo's aot_eager in place of inductor) in either order, and the
adaptive rule on a random model (skips nothing) against a smooth one (skips)."""
import pytest
import torch

from tests.accelerators.test_compile_dit import aot_eager_lane
from tests.lora import with_lora
from tools.dit_factory import build_dit, random_dit_lora, sample_dit
from tools.model_factory import sample


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the rules, on controlled sequences ---------------------------------------------------------------------------
def euler_run(pack, config, predictions, sigmas=None):
    """Runs one CacheEntry as the wrapper does over an Euler path: `predictions[n]` is the derivative a full call
    at step n returns (the sequence's changes are the test's), a skipped call reuses the cached one, and the input
    moves by (sigma_n+1 - sigma_n) * d. Returns the skipped steps."""
    from comfy_accel.accelerators.step_cache import CacheEntry

    steps = len(predictions)
    sigmas = sigmas or [1.0 - n / steps for n in range(steps + 1)]
    entry, skipped, x = CacheEntry(), [], torch.ones(2, 4)
    for step in range(steps):
        if entry.skip(config, step, steps, sigmas[step]):
            skipped.append(step)
            d = entry.predict(config, step)
        else:
            d = predictions[step]
            entry.record(step, sigmas[step], d, measure=config.cache_mode == "adaptive")
        x = x + (sigmas[step + 1] - sigmas[step]) * d
    return skipped


def growing(rates, start=1.0):
    """Predictions whose relative change per unit of sigma (steps of 1/len) is rates[n] between steps n and n+1."""
    values = [start]
    for rate in rates:
        values.append(values[-1] * (1 + rate / len(rates)))
    return [torch.full((2, 4), v) for v in values]


def skipped_steps(pack, config, xs, model=lambda x: 2.0 * x):
    """Runs one CacheEntry over the steps of `xs` (only their count and the schedule matter to the schedules)."""
    return euler_run(pack, config, [model(x) for x in xs])


def inputs_with_changes(changes, start=1.0):
    """Constant tensors whose value moves by each of `changes` from one step to the next."""
    values = [start]
    for change in changes:
        values.append(values[-1] + change)
    return [torch.full((2, 4), v) for v in values]


def config(**kwargs):
    from comfy_accel.accelerators.step_cache import StepCacheConfig

    return StepCacheConfig(**{"start": 0.0, "end": 1.0, **kwargs})


def test_adaptive_skips_while_the_rate_times_the_sigma_travelled_stays_under_the_threshold(pack):
    """12 Euler steps of 1/12 sigma. The prediction changes by 1 relative per unit sigma: k = 1, each step adds
    1/12 = 0.083. Steps 0-2 run (the rate of the pair 0-1 is read only after the full call 2 was queued); from
    then two calls fit under 0.2 after each full one (0.083, 0.167; 0.25 runs)."""
    steady = growing([1.0] * 11)
    assert euler_run(pack, config(threshold=0.2), steady) == [3, 4, 6, 7, 9, 10]
    assert euler_run(pack, config(threshold=0.2, max_consecutive=1), steady) == [3, 5, 7, 9, 11]
    assert euler_run(pack, config(threshold=0.3, max_consecutive=10), steady) == [3, 4, 5, 7, 8, 9, 11]
    assert euler_run(pack, config(threshold=0.0), steady) == []
    # a prediction that moves 4x faster from step 1 on: the decisions after full call 2 still use the pair 0-1's
    # rate (steps 3-5 skipped); after full call 6 they use the pair 1-2's, k = 4 (one step adds 0.36): none fits
    assert euler_run(pack, config(threshold=0.3, max_consecutive=10), growing([1.0] + [4.0] * 10)) == [3, 4, 5]
    # an unchanging prediction (k = 0) skips up to max_consecutive
    assert euler_run(pack, config(threshold=0.01), growing([0.0] * 11)) == [3, 4, 5, 7, 8, 9, 11]


def test_adaptive_reads_each_rate_once_after_the_next_full_call_was_queued(pack, monkeypatch):
    """The device is read once per full call (its rate k), never for the call being decided: the rate measured
    at full call f is read at the first decision after full call f+1 was recorded (so on a GPU the read waits
    for nothing newer than that call's predecessor)."""
    from comfy_accel.accelerators import step_cache

    rates, real = [], step_cache.read_host
    monkeypatch.setattr(step_cache, "read_host", lambda lagged: rates.append(real(lagged)) or rates[-1])
    # full calls 0, 1, 2 (pair rates 1 and 4), then 6 to 11: one read at each decision from step 3 on, each
    # the rate of the full pair before the newest
    skipped = euler_run(pack, config(threshold=0.3, max_consecutive=10), growing([1.0] + [4.0] * 10))
    assert skipped == [3, 4, 5]
    changes = [round(change_d / previous_d * 11, 2) for change_d, previous_d in rates]   # growing()'s rates
    # pairs 0-1, 1-2, 2-6 (four steps of compound growth: 11 * (1.364^4 - 1)), 6-7, 7-8, 8-9; the pairs 9-10
    # and 10-11 no decision needs
    assert changes == [1.0, 4.0, 27.04, 4.0, 4.0, 4.0]
    monkeypatch.setattr(step_cache, "read_host", lambda lagged: pytest.fail("a schedule read the device"))
    assert euler_run(pack, config(cache_mode="taylor", interval=3), growing([1.0] * 11)) == [1, 2, 4, 5, 7, 8, 10, 11]


def test_start_and_end_bound_every_mode(pack):
    xs = inputs_with_changes([0.001] * 11)   # 12 steps, all quiet
    window = config(threshold=0.2, start=0.25, end=0.75, max_consecutive=10)   # steps 3..8
    assert skipped_steps(pack, window, xs) == [3, 4, 5, 6, 7, 8]
    assert skipped_steps(pack, config(cache_mode="interval", interval=3, start=0.25, end=0.75), xs) == [4, 5, 7, 8]
    capped = config(cache_mode="interval", interval=5, max_consecutive=2)
    assert skipped_steps(pack, capped, xs) == [1, 2, 4, 6, 7, 9, 11]
    assert skipped_steps(pack, config(cache_mode="interval", interval=1), xs) == []


def test_taylor_extrapolates_the_last_two_full_steps(pack):
    from comfy_accel.accelerators.step_cache import CacheEntry

    taylor, interval = config(cache_mode="taylor", interval=3), config(cache_mode="interval", interval=3)
    entry = CacheEntry()
    entry.record(0, None, torch.full((3,), 1.0))
    assert torch.equal(entry.predict(taylor, 1), torch.full((3,), 1.0))   # one full step: reuse
    entry.record(3, None, torch.full((3,), 4.0))                              # d grows by 1 per step
    assert torch.allclose(entry.predict(taylor, 5), torch.full((3,), 6.0))
    assert torch.equal(entry.predict(interval, 5), torch.full((3,), 4.0))


def test_the_config_refuses_what_options_py_does_not_allow(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError

    with pytest.raises(AcceleratorInputError, match="cache_mode"):
        config(cache_mode="teacache")
    with pytest.raises(AcceleratorInputError, match="end"):
        config(start=0.6, end=0.5)


# ---- on the real sampler ----------------------------------------------------------------------------------------
def step_cache(model, **kwargs):
    from comfy_accel.accelerators.step_cache import StepCacheConfig, apply

    return apply(model, StepCacheConfig(**kwargs))


def state_of(model):
    from comfy_accel.accelerators.step_cache import step_cache_state

    return step_cache_state(model)


def counted(model, run):
    """(result of run(), number of times the diffusion model's forward actually ran)."""
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


def test_nothing_to_skip_is_bit_identical_to_no_cache(pack, tiny_sd15):
    plain = sample(tiny_sd15, steps=4)
    for settings in (dict(cache_mode="interval", interval=1), dict(threshold=0.0),
                     dict(cache_mode="taylor", interval=1)):
        model = step_cache(tiny_sd15, start=0.0, end=1.0, **settings)
        out, ran = counted(model, lambda: sample(model, steps=4))
        assert torch.equal(out, plain) and ran == 4, settings
        assert state_of(model).last_run["skipped_steps"] == 0


def test_interval_runs_the_model_on_the_scheduled_steps_only(pack, tiny_sd15):
    from comfy_accel.accelerators import events

    plain = sample(tiny_sd15, steps=10)
    model = step_cache(tiny_sd15, cache_mode="interval", interval=3, start=0.0, end=1.0, node_id="sc-interval")
    out, ran = counted(model, lambda: sample(model, steps=10))
    assert ran == 4   # steps 0, 3, 6, 9
    run = state_of(model).last_run
    assert (run["steps"], run["skipped_steps"], run["ran"], run["skipped"]) == (10, 6, 4, 6)
    assert 0 < rel(out, plain) < 1.0
    lines = [n["message"] for n in events.recent(50) if n.get("node") == "sc-interval"]
    assert lines[-1].startswith("skipped 6 of 10 steps (interval, interval 3")
    # a second run starts from nothing: the same result, nothing kept
    assert torch.equal(sample(model, steps=10), out)
    assert state_of(model).entries == {}
    taylor = step_cache(tiny_sd15, cache_mode="taylor", interval=3, start=0.0, end=1.0)
    out_taylor, ran = counted(taylor, lambda: sample(taylor, steps=10))
    assert ran == 4 and not torch.equal(out_taylor, out)


def test_two_evaluation_samplers_follow_the_step_of_each_call(pack, tiny_sd15):
    """Heun evaluates twice per step (at sigma_i and sigma_i+1, the last step once): 7 calls for 4 steps, whose
    steps by sigma position are 0, 1, 1, 2, 2, 3, 3. Interval 2 runs the calls of steps 0 and 2 only."""
    model = step_cache(tiny_sd15, cache_mode="interval", interval=2, start=0.0, end=1.0)
    out, ran = counted(model, lambda: sample(model, steps=4, sampler="heun"))
    run = state_of(model).last_run
    assert (ran, run["calls"], run["steps"], run["skipped_steps"]) == (3, 7, 4, 2)
    assert torch.equal(sample(model, steps=4, sampler="heun"), out)


def device_reads(monkeypatch):
    """Every tensor-to-Python conversion made by step_cache.py's own code, as (function, count): on a GPU each
    is a device-to-host sync."""
    import collections
    import sys

    seen = collections.Counter()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.endswith("accelerators/step_cache.py"):
                seen[caller.f_code.co_name] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return seen


@pytest.mark.parametrize("settings", [dict(threshold=0.2), dict(cache_mode="interval", interval=2),
                                      dict(cache_mode="taylor", interval=2)], ids=["adaptive", "interval", "taylor"])
def test_no_device_read_per_step_on_a_one_evaluation_sampler(pack, monkeypatch, settings):
    """Euler on the real sampler (smooth tiny Wan, 12 steps): the schedules read nothing; adaptive reads the
    schedule once per run and one lagged rate per full call (read_host), never a number of the call it decides."""
    dit = build_dit("tiny-wan21", seed=4, smooth=True)
    model = step_cache(dit, start=0.0, **settings)
    reads = device_reads(monkeypatch)
    sample_dit(model, steps=12, height=16, width=16)
    run = state_of(model).last_run
    if settings.get("cache_mode") in ("interval", "taylor"):
        assert dict(reads) == {} and run["skipped_steps"] == 5
        return
    assert run["skipped_steps"] > 0 and set(reads) == {"schedule_on_host", "read_host"}, reads
    assert reads["schedule_on_host"] == 1 and reads["read_host"] <= run["ran"] - 2


def test_a_lora_loaded_after_the_node_is_what_the_cache_sees(pack):
    """Each run starts from an empty cache, so a LoRA loaded after Step Cache gives what Step Cache on the LoRA'd
    model gives, and not the result without it."""
    dit = build_dit("tiny-wan21", seed=5, smooth=True)
    lora = random_dit_lora(dit)
    settings = dict(threshold=0.2)
    lora_after = with_lora(step_cache(dit, **settings), lora)
    after = sample_dit(lora_after, steps=8, height=16, width=16)
    before = sample_dit(step_cache(with_lora(dit, lora), **settings), steps=8, height=16, width=16)
    assert torch.equal(after, before) and state_of(lora_after).last_run["skipped_steps"] > 0
    assert not torch.equal(after, sample_dit(step_cache(dit, **settings), steps=8, height=16, width=16))


def test_cfg_cutoff_batch_change_starts_a_fresh_entry(pack, tiny_sd15):
    """Batch 2 (cond+uncond) runs steps 0, 3; the first batch-1 step (5) finds no entry of its composition and
    runs, then the schedule continues: 6 and 9 run. Mixing caches would have skipped step 5."""
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig, apply as cutoff

    cut = cutoff(tiny_sd15, CFGCutoffConfig(cutoff_percent=50))
    model = step_cache(cut, cache_mode="interval", interval=3, start=0.0, end=1.0)
    rows = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        sample(model, steps=10)
    finally:
        handle.remove()
    assert rows == [2, 2, 1, 1, 1]
    assert state_of(model).last_run["skipped_steps"] == 5


@pytest.mark.slow   # ~50 s: the UNet traced by dynamo four times (two batch sizes, two orders)
def test_cutoff_step_cache_and_compile_match_the_same_stack_eager(pack, tiny_sd15):
    """CFG Cutoff + Step Cache + the compile lane (aot_eager), in both orders, against the same stack eager: the
    compiled model is only the executor a full call runs."""
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig, apply as cutoff
    from comfy_accel.accelerators.compile.stand_in import session_of

    cut = cutoff(tiny_sd15, CFGCutoffConfig(cutoff_percent=50))
    settings = dict(cache_mode="interval", interval=3, start=0.0, end=1.0)
    eager = sample(step_cache(cut, **settings), steps=8)
    after = step_cache(aot_eager_lane(cut, "sc-compile-first"), **settings)
    before = aot_eager_lane(step_cache(cut, **settings), "sc-cache-first")
    for model in (after, before):
        session = session_of(model)
        assert rel(sample(model, steps=8), eager) < 1e-5
        assert session.calls["compiled"] == 4   # steps 0, 3 (batch 2), 4, 6 (batch 1): never a skipped one
        assert state_of(model).last_run["skipped_steps"] == 4


@pytest.mark.parametrize("order", ["compile first", "cache first"])
def test_a_dit_composes_with_the_compile_lane(pack, order):
    from comfy_accel.accelerators.compile.stand_in import session_of

    dit = build_dit("tiny-flux-dev", seed=2)
    settings = dict(cache_mode="taylor", interval=2, start=0.0, end=1.0)
    eager = sample_dit(step_cache(dit, **settings), steps=5)
    model = (step_cache(aot_eager_lane(dit, f"sc-dit-{order}"), **settings) if order == "compile first"
             else aot_eager_lane(step_cache(dit, **settings), f"sc-dit-{order}"))
    assert rel(sample_dit(model, steps=5), eager) < 1e-5
    assert session_of(model).calls["compiled"] == 3 and state_of(model).last_run["skipped_steps"] == 2


def test_adaptive_skips_on_a_smooth_model_and_not_on_a_random_one(pack):
    """A random DiT's prediction jumps from step to step (its time modulation is random): nothing is skipped and
    the result is bit-identical. With its timestep response damped (the factory's `smooth`) it moves like a
    trained model's, and the same threshold skips steps, closer to the full run than the same number of model
    calls spent on a shorter schedule."""
    plain_model, smooth_model = build_dit("tiny-wan21", seed=4), build_dit("tiny-wan21", seed=4, smooth=True)
    for model, expect_skips in ((plain_model, False), (smooth_model, True)):
        reference = sample_dit(model, steps=10, height=16, width=16)
        cached = step_cache(model, threshold=0.2)
        out, ran = counted(cached, lambda: sample_dit(cached, steps=10, height=16, width=16))
        skipped = state_of(cached).last_run["skipped_steps"]
        assert ran == 10 - skipped
        assert torch.equal(sample_dit(cached, steps=10, height=16, width=16), out)   # deterministic
        if expect_skips:
            shorter = sample_dit(model, steps=10 - skipped, height=16, width=16)
            assert skipped >= 2 and 0 < rel(out, reference) < min(0.15, rel(shorter, reference))
        else:
            assert skipped == 0 and torch.equal(out, reference)
