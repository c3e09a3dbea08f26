"""CFG cutoff on the real ComfyUI sampler: rows computed per step, and exact equality at the extremes."""
import pytest
import torch

from tools.model_factory import sample


def probed(model):
    """A clone that records how many batch rows the UNet computes at each evaluation."""
    from comfy.patcher_extension import WrappersMP

    rows = []

    def probe(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        rows.append((x.shape[0], float(options["sigmas"].max())))
        return executor(x, *args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test.probe", probe)
    return clone, rows


def cutoff(pack, model, percent, sigma=0.0):
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig, apply

    return apply(model, CFGCutoffConfig(cutoff_percent=percent, sigma_threshold=sigma))


def test_never_triggering_cutoff_is_plain_cfg(pack, tiny_sd15):
    plain = sample(tiny_sd15, steps=6, cfg=7.0)
    model, rows = probed(cutoff(pack, tiny_sd15, 100))
    out = sample(model, steps=6, cfg=7.0)
    assert torch.equal(out, plain)
    assert [r for r, _ in rows] == [2] * 6


def test_cutoff_from_first_step_is_cfg_one(pack, tiny_sd15):
    cfg_one = sample(tiny_sd15, steps=6, cfg=1.0)
    model, rows = probed(cutoff(pack, tiny_sd15, 0))
    out = sample(model, steps=6, cfg=7.0)
    assert torch.equal(out, cfg_one)
    assert [r for r, _ in rows] == [1] * 6


def test_midway_cutoff_differs_from_both_and_computes_fewer_rows(pack, tiny_sd15):
    plain = sample(tiny_sd15, steps=6, cfg=7.0)
    cfg_one = sample(tiny_sd15, steps=6, cfg=1.0)
    model, rows = probed(cutoff(pack, tiny_sd15, 50))
    out = sample(model, steps=6, cfg=7.0)
    assert [r for r, _ in rows] == [2, 2, 2, 1, 1, 1]
    assert not torch.allclose(out, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(out, cfg_one, rtol=0, atol=1e-6)
    assert (out - plain).norm() / plain.norm() > 1e-4


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_two_evaluation_samplers_switch_once(pack, tiny_sd15, sampler):
    """Heun/dpm_2 evaluate at intermediate sigmas: both evaluations of a step must agree."""
    model, rows = probed(cutoff(pack, tiny_sd15, 50))
    sample(model, steps=6, cfg=7.0, sampler=sampler)
    batch_rows = [r for r, _ in rows]
    assert len(batch_rows) > 6  # two evaluations for most steps
    switch = batch_rows.index(1)
    assert set(batch_rows[:switch]) == {2} and set(batch_rows[switch:]) == {1}
    assert sum(batch_rows) < 2 * len(batch_rows)


def test_sigma_threshold(pack, tiny_sd15):
    model, rows = probed(cutoff(pack, tiny_sd15, 100, sigma=2.0))
    sample(model, steps=6, cfg=7.0)
    assert rows and all((r == 1) == (s <= 2.0) for r, s in rows)
    assert {r for r, _ in rows} == {1, 2}


@pytest.mark.parametrize("value", [-1, 100.5, 150, "abc"])
def test_cutoff_outside_range_is_refused_clearly(pack, value):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig

    with pytest.raises(AcceleratorInputError, match="cutoff_percent must be"):
        CFGCutoffConfig(cutoff_percent=value)
