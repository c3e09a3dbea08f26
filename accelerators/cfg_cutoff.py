"""CFG cutoff: stop computing the unconditional branch after a chosen point of the run.

Late steps barely change with guidance, so after the cutoff the uncond entry is dropped from the model
batch (batch 2 → 1 per step: real compute saved, not merely ignored) and the cond prediction stands in
for it, which makes CFG's `uncond + (cond - uncond) * scale` exactly `cond`. Hooked as a CALC_COND_BATCH
wrapper (ComfyUI research notes §1.5b), so it composes with every other wrapper and works for any
sampler: the step is found by sigma position, never by exact float match (Heun, dpm_2 included).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import options
from .base import AcceleratorSpec, Availability
from .sampling_progress import current_step, install_step_tracking

WRAPPER_KEY = "comfy_accel.cfg_cutoff"


@dataclass
class CFGCutoffConfig:
    # skip uncond from this % of the steps on (0 = from the first, 100 = never)
    cutoff_percent: float = options.CFG_CUTOFF_PERCENT.default
    # if > 0: skip uncond once sigma <= this instead (overrides the percent)
    sigma_threshold: float = options.SIGMA_THRESHOLD.default

    def __post_init__(self):
        self.cutoff_percent = options.CFG_CUTOFF_PERCENT.parse("cutoff_percent", self.cutoff_percent)
        self.sigma_threshold = options.SIGMA_THRESHOLD.parse("sigma_threshold", self.sigma_threshold)

    def uncond_skipped(self, sigma, sample_sigmas, transformer_options=None) -> bool:
        if self.sigma_threshold > 0:  # reads the sigma: one device sync per step, only in this mode
            return float(sigma.max() if hasattr(sigma, "max") else sigma) <= self.sigma_threshold
        step, total = current_step(transformer_options, sigma, sample_sigmas)
        return step >= round(total * self.cutoff_percent / 100.0)


def cfg_cutoff_wrapper_factory(config: CFGCutoffConfig):
    def cfg_cutoff_wrapper(executor, model, conds, x_in, timestep, model_options):
        uncond_present = len(conds) > 1 and conds[1] is not None
        transformer_options = model_options.get("transformer_options", {})
        sample_sigmas = transformer_options.get("sample_sigmas")
        if not uncond_present or not config.uncond_skipped(timestep, sample_sigmas, transformer_options):
            return executor(model, conds, x_in, timestep, model_options)
        # Same as ComfyUI's cfg=1 path: a None uncond is never batched; the cond result stands in for it.
        out = executor(model, [conds[0], None, *conds[2:]], x_in, timestep, model_options)
        out = list(out)
        out[1] = out[0]
        return out

    return cfg_cutoff_wrapper


def apply(model, config: CFGCutoffConfig):
    """Returns a clone of the ModelPatcher whose uncond branch stops after the cutoff."""
    from comfy.patcher_extension import WrappersMP

    patched = model.clone()
    patched.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    patched.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, cfg_cutoff_wrapper_factory(config))
    install_step_tracking(patched)
    patched.model_options.setdefault("transformer_options", {})["comfy_accel_cfg_cutoff"] = {
        "cutoff_percent": config.cutoff_percent, "sigma_threshold": config.sigma_threshold}
    return patched


ACCELERATOR_SPECS = [AcceleratorSpec(
    name="cfg_cutoff", title="CFG Cutoff",
    description="Skips the unconditional (negative) pass after a share of the steps: batch 2 → 1.",
    config=CFGCutoffConfig, available=lambda: Availability(True, "works with any model and sampler"),
    apply=apply, kind="model", lossless=False, order=40)]
