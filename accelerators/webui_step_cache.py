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
own entry. The adaptive rule reads the sigma of a call from the pass's schedule (host floats, no device read); a
sampler that calls the model more than once per step (calls ≠ schedule steps) or has no sigma schedule (DDIM,
PLMS) gets no sigma, and adaptive then skips nothing there (said in the job's notes).
"""
from __future__ import annotations

from typing import Callable

from .step_cache import CacheEntry, StepCacheConfig


class UNetStepCache:
    """One job's step cache on the WebUI UNet: the entries of the current pass, the counts of the whole job."""

    def __init__(self, config: StepCacheConfig):
        self.config = config
        self.passes = 0
        self.entries: dict[tuple, CacheEntry] = {}
        self.schedule: list[float] | None = None
        self.call: tuple[int, int] | None = None   # (denoiser call of this pass, calls the pass expects)
        self.counts = {"ran": 0, "skipped": 0}
        self.steps_seen: set[tuple[int, int]] = set()
        self.steps_run: set[tuple[int, int]] = set()
        self.notes: list[str] = []
        self.calls_are_steps = True   # every pass called the UNet once per step of its schedule

    def begin_pass(self, schedule: list[float] | None) -> None:
        """A new sampling pass (txt2img, img2img, the hires pass): no cache crosses passes."""
        self.passes += 1
        self.entries.clear()
        self.schedule = schedule
        self.call = None

    def at_call(self, index: int, total: int) -> None:
        self.call = (index, max(int(total), 1))
        if self.schedule is None or len(self.schedule) - 1 != self.call[1]:
            self.calls_are_steps = False

    def _sigma(self, index: int, total: int) -> float | None:
        if self.config.cache_mode != "adaptive":
            return None
        if self.schedule is None or len(self.schedule) - 1 != total:
            note = ("Step Cache adaptive skipped nothing: this sampler calls the UNet more than once per step or has "
                    "no sigma schedule (interval and taylor work with it)")
            if note not in self.notes:
                self.notes.append(note)
            return None
        return self.schedule[index]

    def __call__(self, run: Callable, x, timesteps, context, *args, **kwargs):
        if self.call is None:   # the host never said which call this is: run it
            self.counts["ran"] += 1
            return run(x, timesteps, context, *args, **kwargs)
        import torch

        index, total = self.call
        self.steps_seen.add((self.passes, index))
        entry = self.entries.setdefault((tuple(x.shape), x.dtype, x.device), CacheEntry())
        sigma = self._sigma(index, total)
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
        line = (f"skipped {skipped} of {steps} {unit} ({self.config.describe()}; "
                f"{self.counts['ran']} of {calls} UNet calls ran)")
        return {"steps": steps, "skipped_steps": skipped, "calls": calls, **self.counts, "unit": unit,
                "line": line}
