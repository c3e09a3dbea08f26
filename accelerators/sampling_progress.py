"""Where a sampling run is, seen from inside a ComfyUI wrapper, for any sampler.

Samplers such as Heun, dpm_2 and the 2S family evaluate the model at sigmas between the schedule's
points, so exact float matching against `sample_sigmas` misses steps. The step of an evaluation is the
last schedule point whose sigma is >= the current sigma (within a relative tolerance).
"""
from __future__ import annotations

import torch


def step_of(sigma, sample_sigmas) -> tuple[int, int]:
    """(step index, total steps) for the model evaluation at `sigma` under the schedule `sample_sigmas`."""
    if sample_sigmas is None:
        return 0, 1
    sigmas = sample_sigmas.detach().float().cpu()
    total = max(len(sigmas) - 1, 1)
    value = float(sigma.detach().float().max().item() if torch.is_tensor(sigma) else sigma)
    at_or_above = (sigmas >= value * (1 - 1e-5)).nonzero()
    if len(at_or_above) == 0:
        return 0, total
    return min(int(at_or_above.max()), total - 1), total


# ---- the step without a device sync ------------------------------------------------------------------------
# Reading the current sigma (`sigma.item()`) waits for the GPU: harmless in eager mode, where the CPU is the
# bottleneck anyway, but with CUDA graphs it stops the CPU from queuing the next step while the GPU runs this
# one (docs/benchmarks.md: compile+cutoff-50 "before the sync fix"). ComfyUI's KSAMPLER
# reports every finished step through its callback, so a SAMPLER_SAMPLE wrapper counts them. That count is the
# step of every model evaluation only for samplers that evaluate once per step, before the callback: dpm_2
# calls back between its two evaluations (its midpoint would count as the next step) and Heun-like samplers
# evaluate twice, so only the samplers below use the count; every other one reads the sigma (one sync per call).
STEP_KEY = "comfy_accel_step"
STEP_WRAPPER_KEY = "comfy_accel.steps"
ONE_EVALUATION_PER_STEP = frozenset({
    "sample_euler", "sample_euler_ancestral", "sample_euler_cfg_pp", "sample_euler_ancestral_cfg_pp",
    "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_gpu", "sample_dpmpp_3m_sde",
    "sample_dpmpp_3m_sde_gpu", "sample_lcm", "sample_ipndm", "sample_ipndm_v", "sample_deis",
})


class StepTracker:
    def __init__(self, total: int):
        self.total = total
        self.step = 0


def counts_steps_exactly(ksampler) -> bool:
    """Whether KSAMPLER's callback count is the step of each model evaluation for this sampler."""
    return getattr(getattr(ksampler, "sampler_function", None), "__name__", "") in ONE_EVALUATION_PER_STEP


def step_tracking_wrapper(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: puts a StepTracker in this run's transformer_options, advanced by the callback."""
    from comfy.samplers import KSAMPLER

    sampler = executor.class_obj
    if not isinstance(sampler, KSAMPLER) or not counts_steps_exactly(sampler):  # sigma lookup instead
        return executor(guider, sigmas, extra_args, callback, *args, **kwargs)
    tracker = StepTracker(max(len(sigmas) - 1, 1))
    options = extra_args.setdefault("model_options", {}).setdefault("transformer_options", {})
    options[STEP_KEY] = tracker

    def tracked(step, *callback_args):
        tracker.step = step + 1
        if callback is not None:
            return callback(step, *callback_args)

    try:
        return executor(guider, sigmas, extra_args, tracked, *args, **kwargs)
    finally:
        options.pop(STEP_KEY, None)  # a later run with another sampler must not read a stale count


def install_step_tracking(patcher) -> None:
    """Adds the step-counting wrapper to a ModelPatcher clone (one per model, whichever accelerator asks)."""
    from comfy.patcher_extension import WrappersMP

    patcher.remove_wrappers_with_key(WrappersMP.SAMPLER_SAMPLE, STEP_WRAPPER_KEY)
    patcher.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, STEP_WRAPPER_KEY, step_tracking_wrapper)


def tracked_step(transformer_options: dict | None, sample_sigmas) -> tuple[int, int] | None:
    """(step, total) from the run's StepTracker, without a sync; None where there is none for this run."""
    tracker = (transformer_options or {}).get(STEP_KEY)
    if tracker is not None and sample_sigmas is not None and tracker.total == max(len(sample_sigmas) - 1, 1):
        return min(tracker.step, tracker.total - 1), tracker.total
    return None


def current_step(transformer_options: dict | None, sigma, sample_sigmas) -> tuple[int, int]:
    """(step, total) from the run's StepTracker when there is one (no sync), else from the sigma."""
    return tracked_step(transformer_options, sample_sigmas) or step_of(sigma, sample_sigmas)
