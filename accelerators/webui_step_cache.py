"""Step Cache on the WebUI's UNet: the A1111 face of `step_cache.py` (the same config, decision and reuse math).

Host-agnostic: the WebUI shim (scripts/comfy_accel_webui.py) calls `UNetStepCache.__call__` from the pack's SdUnet
with the UNet call's inputs and the function that runs the UNet (the pack's runner: eager, compiled, DeepCache),
and says where the pass is (`begin_pass` with the pass's sigma schedule, `at_call` with A1111's denoiser call count
from `on_cfg_denoiser`). Nothing here imports the WebUI.

A1111's `SdUnet.forward(x, timesteps, context)` returns the eps (v for v-models) the denoiser turns into `denoised =
x - sigma * eps`: for the eps-prediction SD models that output IS the derivative `d` the k-diffusion sampler
integrates, which is what ComfyUI's face caches. So a skipped call returns the cached output (interval, adaptive)
or its first-order extrapolation (taylor), from `step_cache.CacheEntry`. A step here is one denoiser call (A1111's
own count, `CFGDenoiser.step`); the window and the interval count those calls, which for one-evaluation samplers
(Euler, DPM++ 2M, ...) are the steps; where they are not (Heun: two calls a step), what ran is said in UNet calls.
Entries are keyed by the call's batch shape: A1111 batches cond rows then
uncond rows, and its uncond skip (NGMS, the pack's CFG cutoff) drops the uncond rows, a new composition with its
own entry.

The adaptive rule needs the sigma of every call, taken, in this order, from:
1. the pass's sigma schedule, where the sampler calls the UNet once per step of it (host floats, no device read);
2. the sampler's own timesteps where they say which timestep each call gets: A1111's DDIM and PLMS (the shim asks
   the sampler's `get_timesteps` once per pass), the sigma of timestep t being sqrt((1 - ᾱ_t) / ᾱ_t) from the
   model's `alphas_cumprod`, copied to the host once per pass (`sigma_of_timestep`);
3. otherwise (Heun, DPM2, the 2S/SDE family, Restart: more than one call per step of the schedule; UniPC: no
   schedule) the timestep the call itself carries, one device read per call, turned into its sigma the same way
   (k-diffusion's denoisers turn sigma into a fractional t that maps back to it).
Only where none of these exists (no `alphas_cumprod`) does adaptive skip nothing, said in the job's notes. DDIM's
(eta 0) update is exactly an Euler step in sigma on x/sqrt(ᾱ), k-diffusion's variable, with its eps as `d`, so the
rule's `k·|Δsigma|` means there what it means for Euler; for PLMS it is an estimate, as for multistep samplers.
On samplers with several calls per step the steps are UNet calls and the rate `k` is measured between consecutive
full calls at their own sigmas, which is still the relative change of the output per unit of sigma; two calls at
the same sigma (Heun's correction call and the next step's first call) travel no sigma, so they give no rate and
the change estimated between them is zero.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from .step_cache import CacheEntry, StepCacheConfig

NO_SIGMA_NOTE = ("Step Cache adaptive skipped nothing: no sigma for this sampler's UNet calls (no sigma schedule "
                 "matching them and no alphas_cumprod; interval and taylor work with it)")


def sigma_of_timestep(t: float, alphas_cumprod: Sequence[float]) -> float:
    """The sigma of (discrete) timestep `t`, sqrt((1 - ᾱ_t) / ᾱ_t); a fractional `t` lies between its two neighbours
    linearly in log sigma (how k-diffusion's CompVis denoisers map t back to sigma). `t` is clamped to the table."""
    last = len(alphas_cumprod) - 1
    t = min(max(float(t), 0.0), float(last))
    low = math.floor(t)
    weight = t - low

    def log_sigma(i: int) -> float:
        alpha = float(alphas_cumprod[i])
        return 0.5 * (math.log(1.0 - alpha) - math.log(alpha))

    if weight == 0.0:
        return math.exp(log_sigma(low))
    return math.exp((1.0 - weight) * log_sigma(low) + weight * log_sigma(low + 1))


class UNetStepCache:
    """One job's step cache on the WebUI UNet: the entries of the current pass, the counts of the whole job."""

    def __init__(self, config: StepCacheConfig):
        self.config = config
        self.passes = 0
        self.entries: dict[tuple, CacheEntry] = {}
        self.schedule: list[float] | None = None
        self.alphas_cumprod: list[float] | None = None
        self.call_sigmas: list[float] | None = None   # the sigma of each call of the pass, from host timesteps
        self.call: tuple[int, int] | None = None   # (denoiser call of this pass, calls the pass expects)
        self.counts = {"ran": 0, "skipped": 0}
        self.sigma_sources = {"schedule": 0, "timesteps": 0, "read": 0}   # adaptive: where each call's sigma came from
        self.steps_seen: set[tuple[int, int]] = set()
        self.steps_run: set[tuple[int, int]] = set()
        self.notes: list[str] = []
        self.calls_are_steps = True   # every pass called the UNet once per step of its schedule

    def begin_pass(self, schedule: list[float] | None, alphas_cumprod: Sequence[float] | None = None,
                   call_timesteps: Sequence[float] | None = None) -> None:
        """A new sampling pass (txt2img, img2img, the hires pass): no cache crosses passes. `schedule`: the pass's
        sigmas; `alphas_cumprod`: the model's ᾱ table (host floats); `call_timesteps`: the timestep of each UNet
        call of the pass where the sampler says (DDIM, PLMS)."""
        self.passes += 1
        self.entries.clear()
        self.schedule = schedule
        self.alphas_cumprod = list(alphas_cumprod) if alphas_cumprod is not None else None
        self.call_sigmas = None
        if call_timesteps is not None and self.alphas_cumprod:
            self.call_sigmas = [sigma_of_timestep(t, self.alphas_cumprod) for t in call_timesteps]
        self.call = None

    def at_call(self, index: int, total: int) -> None:
        self.call = (index, max(int(total), 1))
        if self.schedule is None or len(self.schedule) - 1 != self.call[1]:
            self.calls_are_steps = False

    def _sigma(self, index: int, total: int, timesteps) -> float | None:
        """The sigma of this call for the adaptive rule (module docstring: where it comes from), else None."""
        if self.config.cache_mode != "adaptive":
            return None
        if self.schedule is not None and len(self.schedule) - 1 == total:
            self.sigma_sources["schedule"] += 1
            return self.schedule[index]
        if self.call_sigmas is not None and index < len(self.call_sigmas):
            self.sigma_sources["timesteps"] += 1
            return self.call_sigmas[index]
        if self.alphas_cumprod:
            self.sigma_sources["read"] += 1   # the one device read per call: this sampler has no host sigma
            return sigma_of_timestep(float(timesteps.detach().max()), self.alphas_cumprod)
        if NO_SIGMA_NOTE not in self.notes:
            self.notes.append(NO_SIGMA_NOTE)
        return None

    def __call__(self, run: Callable, x, timesteps, context, *args, **kwargs):
        if self.call is None:   # the host never said which call this is: run it
            self.counts["ran"] += 1
            return run(x, timesteps, context, *args, **kwargs)
        import torch

        index, total = self.call
        self.steps_seen.add((self.passes, index))
        entry = self.entries.setdefault((tuple(x.shape), x.dtype, x.device), CacheEntry())
        sigma = self._sigma(index, total, timesteps)
        if entry.skip(self.config, index, total, sigma):
            self.counts["skipped"] += 1
            return entry.predict(self.config, index).to(self.output_dtype)
        out = run(x, timesteps, context, *args, **kwargs)
        self.counts["ran"] += 1
        self.steps_run.add((self.passes, index))
        self.output_dtype = out.dtype
        # a copy: a CUDA-graph replay of the compiled UNet overwrites its output buffer at the next call
        entry.record(index, sigma, out.detach().to(torch.float32, copy=True),
                     measure=self.config.cache_mode == "adaptive")
        return out

    def summary(self) -> dict:
        steps = len(self.steps_seen)
        skipped = len(self.steps_seen - self.steps_run)
        calls = self.counts["ran"] + self.counts["skipped"]
        unit = "steps" if self.calls_are_steps else "UNet calls"
        decided = sum(self.sigma_sources.values())   # adaptive: calls decided on a sigma
        with_sigma = f", {decided} decided on their sigma" if self.config.cache_mode == "adaptive" else ""
        line = (f"skipped {skipped} of {steps} {unit} ({self.config.describe()}; "
                f"{self.counts['ran']} of {calls} UNet calls ran{with_sigma})")
        return {"steps": steps, "skipped_steps": skipped, "calls": calls, **self.counts, "unit": unit,
                "decided": decided, "sigma_sources": dict(self.sigma_sources), "line": line}
