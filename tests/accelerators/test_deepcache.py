"""DeepCache on the real ComfyUI sampler with the tiny SD1.5 / SDXL models.

Random weights make closeness a consistency check, not a quality figure: the checks compare DeepCache with
what the same number of deep UNet passes buys otherwise (fewer steps), and with itself across branches.
"""
import copy

import pytest
import torch

from tools.model_factory import sample


def deepcache(pack, model, **kwargs):
    from comfy_accel.accelerators.deepcache import DeepCacheConfig, apply

    return apply(model, DeepCacheConfig(**kwargs))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def probed(model):
    """A clone with an outer DIFFUSION_MODEL probe (added before DeepCache, so it wraps it).

    Records per UNet call the batch rows and the relative error of the returned prediction against the
    host's own forward on the very same input.
    """
    from comfy.patcher_extension import WrappersMP

    calls = []

    def probe(executor, x, t, context, y, control, options, **kwargs):
        reference = executor.class_obj._forward(x, t, context=context, y=y, control=None,
                                                transformer_options=copy.copy(options), **kwargs)
        out = executor(x, t, context, y, control, options, **kwargs)
        calls.append({"rows": x.shape[0], "error": rel(out, reference)})
        return out

    clone = model.clone()
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test.probe", probe)
    return clone, calls


@pytest.fixture(params=["tiny_sd15", "tiny_sdxl"])
def tiny(request):
    return request.getfixturevalue(request.param)


def deep_calls(pack, base, steps, sampler="euler", **config):
    """(latent, [index of each call that ran the deep blocks], per-call records) of a DeepCache run."""
    model, calls = probed(base)
    patched = deepcache(pack, model, **config)
    middle = []
    # middle_block[0]: forward_timestep_embed iterates the block's layers, so a hook on the block never fires
    handle = patched.model.diffusion_model.middle_block[0].register_forward_hook(
        lambda *args: middle.append(len(calls)))
    try:
        out = sample(patched, steps=steps, sampler=sampler)
    finally:
        handle.remove()
    # every call runs the probe's reference forward (one middle pass) and, on a full step, DeepCache's own
    deep = [i for i in range(len(calls)) if middle.count(i) == 2]
    assert all(middle.count(i) in (1, 2) for i in range(len(calls)))
    return out, deep, calls


def test_interval_one_equals_the_plain_model_exactly(pack, tiny):
    plain = sample(tiny, steps=6)
    assert torch.equal(sample(deepcache(pack, tiny, cache_interval=1), steps=6), plain)


def test_interval_three_runs_the_deep_blocks_on_steps_0_3_6_only(pack, tiny):
    out, deep, calls = deep_calls(pack, tiny, steps=9, cache_interval=3)
    assert len(calls) == 9
    assert deep == [0, 3, 6]
    errors = [c["error"] for c in calls]
    assert all(errors[i] == 0.0 for i in deep)  # full steps are the host forward, bit for bit
    assert all(errors[i] > 0.0 for i in range(9) if i not in deep)


def test_start_and_end_percent_bound_the_cached_window(pack, tiny_sd15):
    _, deep, _ = deep_calls(pack, tiny_sd15, steps=10, cache_interval=3, start_percent=30, end_percent=80)
    assert deep == [0, 1, 2, 3, 6, 8, 9]


def test_interval_three_stays_close(pack, tiny_sdxl):
    """Closer to the plain run than spending the same deep passes on a 3x shorter schedule; deeper branches
    and shorter intervals are closer still; cached predictions improve as the noise level falls."""
    plain = sample(tiny_sdxl, steps=9)
    fewer_steps = sample(tiny_sdxl, steps=3)
    out, deep, calls = deep_calls(pack, tiny_sdxl, steps=9, cache_interval=3)
    assert rel(out, plain) < rel(fewer_steps, plain)
    assert rel(out, plain) < 0.5
    deeper, _, deeper_calls = deep_calls(pack, tiny_sdxl, steps=9, cache_interval=3, cache_branch=3)
    assert rel(deeper, plain) < rel(out, plain)
    assert rel(sample(deepcache(pack, tiny_sdxl, cache_interval=2), steps=9), plain) < rel(out, plain)
    cached = [i for i in range(9) if i not in deep]
    assert all(deeper_calls[i]["error"] < calls[i]["error"] for i in cached)
    assert calls[cached[-1]]["error"] < calls[cached[0]]["error"] / 3


def test_runs_are_independent(pack, tiny_sd15):
    """The OUTER_SAMPLE wrapper resets the cache: a second run never reuses the first run's features."""
    model = deepcache(pack, tiny_sd15, cache_interval=3)
    first = sample(model, steps=6)
    assert torch.equal(sample(model, steps=6), first)
    from comfy_accel.accelerators.deepcache import deepcache_state

    state = deepcache_state(model)
    assert state.last_run == {"full": 2, "shallow": 4, "host": 0, "calls": 6}
    assert state.entries == {}  # features dropped with the run


def test_cfg_cutoff_keeps_the_schedule_by_reusing_the_cond_rows(pack, tiny_sdxl):
    """CFG cutoff halves the batch mid-run: the cond rows of the cached batch-2 feature serve batch 1."""
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig, apply as cutoff

    cut = cutoff(tiny_sdxl, CFGCutoffConfig(cutoff_percent=50))
    reference = sample(cut, steps=10)
    out, deep, calls = deep_calls(pack, cut, steps=10, cache_interval=3)
    assert [c["rows"] for c in calls] == [2] * 5 + [1] * 5
    assert deep == [0, 3, 6, 9]  # step 5 (first batch-1 call) is served from the batch-2 cache
    assert calls[5]["error"] > 0
    assert rel(out, reference) < rel(sample(cut, steps=4), reference)
    # interval 1 under the cutoff is still exact
    assert torch.equal(sample(deepcache(pack, cut, cache_interval=1), steps=10), reference)


@pytest.mark.parametrize("sampler,expected", [("heun", [0, 5, 6]), ("dpm_2", [0, 1, 6, 7])])
def test_two_evaluation_samplers_refresh_on_the_scheduled_steps(pack, tiny_sd15, sampler, expected):
    """Heun evaluates at sigma_i and sigma_i+1, dpm_2 at sigma_i and between: every evaluation that belongs to
    scheduled step 0 or 3 (by sigma position, not by counting calls) runs the deep blocks."""
    plain = sample(tiny_sd15, steps=6, sampler=sampler)
    out, deep, calls = deep_calls(pack, tiny_sd15, steps=6, sampler=sampler, cache_interval=3)
    assert len(calls) == 11 and deep == expected
    assert all(calls[i]["error"] == 0.0 for i in deep)
    assert rel(out, plain) < rel(sample(tiny_sd15, steps=6, sampler=sampler, cfg=1.0), plain)


@pytest.mark.parametrize("sampler,reads_sigma", [("euler", False), ("dpmpp_2m", False), ("dpm_2", True),
                                                  ("heun", True)])
def test_step_comes_from_the_callback_count_only_for_one_evaluation_samplers(pack, tiny_sd15, monkeypatch,
                                                                              sampler, reads_sigma):
    """Reading the sigma waits for the GPU; one-evaluation samplers are counted by KSAMPLER's callback instead,
    and land on the same steps (0, 3 of 6)."""
    from comfy_accel.accelerators import deepcache as module

    lookups = []
    original = module.step_of
    monkeypatch.setattr(module, "step_of", lambda *a: lookups.append(a) or original(*a))
    out, deep, calls = deep_calls(pack, tiny_sd15, steps=6, sampler=sampler, cache_interval=3)
    assert bool(lookups) == reads_sigma
    if not reads_sigma:
        assert deep == [0, 3] and len(calls) == 6


def test_one_evaluation_samplers_are_named_by_the_host(pack, comfy_path):
    """The allowlist names ComfyUI's own sampler functions: a rename in the host would silently cost a sync."""
    import comfy.samplers

    from comfy_accel.accelerators.sampling_progress import ONE_EVALUATION_PER_STEP, counts_steps_exactly

    host = {f"sample_{name}" for name in comfy.samplers.KSAMPLER_NAMES}
    assert ONE_EVALUATION_PER_STEP <= host, ONE_EVALUATION_PER_STEP - host
    assert counts_steps_exactly(comfy.samplers.ksampler("euler"))
    assert not counts_steps_exactly(comfy.samplers.ksampler("dpm_2"))
    assert not counts_steps_exactly(comfy.samplers.ksampler("heun"))


def test_wrappers_added_after_deepcache_still_run_around_it(pack, tiny_sd15):
    """DeepCache stands in for the host forward at the end of the DIFFUSION_MODEL chain: a wrapper added
    after it is not bypassed, on full and on cached calls alike."""
    from comfy.patcher_extension import WrappersMP

    reference = sample(deepcache(pack, tiny_sd15, cache_interval=3), steps=6)
    model = deepcache(pack, tiny_sd15, cache_interval=3)
    seen = []

    def inner(executor, x, *args, **kwargs):
        out = executor(x, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test.inner", inner)
    assert torch.equal(sample(model, steps=6), reference)
    assert len(seen) == 6


# -- composition with the compile lane -------------------------------------------------------------------------
def test_segments_reach_the_installed_compiler_with_stable_functions(pack, tiny_sdxl):
    from comfy_accel.accelerators.segments import install_segment_compiler

    eager = deepcache(pack, tiny_sdxl, cache_interval=3, cache_branch=1)
    reference = sample(eager, steps=6)
    seen = []
    functions = {}

    def compiler(name, fn, *tensors):
        assert all(torch.is_tensor(t) for t in tensors), name
        seen.append(name)
        assert functions.setdefault(name, fn) is fn, f"{name} got a new function"
        return fn(*tensors)

    model = eager.clone()
    install_segment_compiler(model.model_options, compiler)
    out = sample(model, steps=6)
    assert torch.equal(out, reference)
    names = ("deepcache.b1.shallow_in", "deepcache.b1.deep", "deepcache.b1.shallow_out")
    full, cached = list(names), [names[0], names[2]]
    assert seen == full + cached * 2 + full + cached * 2
    sample(model, steps=6)
    assert len(functions) == 3  # the same three functions in the next run


def sdpa_override(func, *args, **kwargs):
    """ComfyUI's official attention override: SDPA instead of the CPU default (which asks psutil for free
    memory inside the graph, a graph break that has nothing to do with DeepCache)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


@pytest.mark.slow
def test_torch_compile_traces_each_segment_once_not_per_step(pack, tiny_sd15):
    """With a torch.compile segment compiler, each segment compiles once per shape: no per-step recompiles."""
    import torch._dynamo

    from comfy_accel.accelerators.segments import install_segment_compiler
    from comfy_extras.nodes_freelunch import FreeU_V2

    base = FreeU_V2().patch(tiny_sd15, 1.3, 1.4, 0.9, 0.2)[0]
    base.model_options["transformer_options"]["optimized_attention_override"] = sdpa_override
    eager = deepcache(pack, base, cache_interval=3)
    reference = sample(eager, steps=6)
    compiles = {}
    compiled = {}

    def compiler(name, fn, *tensors):
        if name not in compiled:
            def backend(graph_module, example_inputs):
                compiles[name] = compiles.get(name, 0) + 1
                return graph_module.forward
            compiled[name] = torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)
        return compiled[name](*tensors)

    model = eager.clone()
    install_segment_compiler(model.model_options, compiler)
    torch._dynamo.reset()
    try:
        out = sample(model, steps=6)
        after_first_run = dict(compiles)
        again = sample(model, steps=6)
    finally:
        torch._dynamo.reset()
    assert after_first_run == {"deepcache.b0.shallow_in": 1, "deepcache.b0.deep": 1, "deepcache.b0.shallow_out": 1}
    assert compiles == after_first_run  # the second run (new options dicts, new uuids) reuses every graph
    assert torch.equal(out, reference) and torch.equal(again, reference)


# -- inputs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("cache_interval", 0, "cache_interval must be between"),
    ("cache_interval", 2.5, "whole number"),
    ("cache_branch", -1, "cache_branch must be between"),
    ("start_percent", 120, "start_percent must be between"),
    ("end_percent", "x", "end_percent must be a number"),
])
def test_bad_settings_are_refused_clearly(pack, field, value, match):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.deepcache import DeepCacheConfig

    with pytest.raises(AcceleratorInputError, match=match):
        DeepCacheConfig(**{field: value})


def test_window_must_not_be_inverted(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.deepcache import DeepCacheConfig

    with pytest.raises(AcceleratorInputError, match="end_percent"):
        DeepCacheConfig(start_percent=60, end_percent=40)


def test_branch_beyond_the_model_is_refused(pack, tiny_sdxl):
    from comfy_accel.accelerators.base import AcceleratorInputError

    with pytest.raises(AcceleratorInputError, match=r"cache_branch must be between 0 and 3 .*4 skip branches"):
        deepcache(pack, tiny_sdxl, cache_branch=4)


def test_a_non_unet_input_is_refused(pack, comfy_path):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from tools.taesd_factory import make_tiny_vae

    with pytest.raises(AcceleratorInputError, match="DeepCache needs a MODEL"):
        deepcache(pack, make_tiny_vae("sd"))


def test_registry_lists_deepcache_freeu_and_taesd(pack):
    from comfy_accel.accelerators import registry

    specs = registry.all_specs()
    assert (specs["deepcache"].kind, specs["deepcache"].lossless) == ("model", False)
    assert (specs["freeu"].kind, specs["freeu"].lossless) == ("model", True)
    assert (specs["taesd"].kind, specs["taesd"].lossless) == ("vae", False)
    rows = {row["name"]: row for row in registry.status()}
    assert rows["deepcache"]["options"]["cache_interval"] == 3
    assert "DeepCache" in rows["freeu"]["reason"] and "TensorRT" in rows["freeu"]["reason"]
    assert rows["taesd"]["available"] is True
