"""Step Cache: skip whole model calls on steps where the prediction barely changes, for any diffusion model.

What is reused. A skipped call returns `x - sigma * d`, where `d = (x - denoised) / sigma` is the derivative the
k-diffusion samplers integrate, kept from the last full call(s) of the same batch composition. For eps and flow
models `d` IS the model's output (eps, velocity), so this is EasyCache's "reuse the model's output-minus-input
change" expressed in the one space every ComfyUI model shares; it needs no model-specific forward and no
calibration, and works for UNets and DiTs alike.

Which steps are skipped (`mode`):
- `adaptive`: EasyCache's rule (arXiv 2507.02860, core's `nodes_easycache.py`), chosen because it is the only
  published rule that is calibration-free AND model-agnostic: it looks at the model's input, which exists
  before anything runs. First Block Cache needs block 0 of the model to run first, i.e. a model-specific split
  of its forward; TeaCache and MagCache need fitted per-model (per-step-count) tables. From two full calls,
  `k = mean|d1 - d0| / mean|x1 - x0|` says how much the prediction moves per unit of input change; each later
  call adds `k * mean|x_t - x_prev| / mean|d|` (the estimated relative change of the prediction) to an
  accumulator, skipping while it stays under `threshold`; a full call resets it. Threshold 0 never skips.
  Without a device read per step: an Euler step moves the input by `(sigma_next - sigma) * d`, and after a
  full call every `d` until the next one is the cached one, so `mean|x1 - x0| = |sigma1 - sigma0| * mean|d0|`
  and the accumulated change since the last full call at `sigma_f` is exactly `k * |sigma_f - sigma_t|`: host
  numbers (the schedule, copied to the CPU once per run). For multistep and ancestral samplers these are
  estimates of what EasyCache measures. The rule needs no input, so the WebUI face (`webui_step_cache.py`,
  the UNet's eps output as `d`) runs the same `CacheEntry`.
  `k` itself is measured on the device at each full call and read only after the NEXT full call was queued
  (`LaggedScalars`: a non-blocking copy into pinned memory and an event), so the read never waits for the
  newest model call; a decision therefore uses the rate of the pair of full calls before the newest one, and
  the first skip can come only after three full calls. Where a sync remains: the schedule's copy to the CPU
  (once per run) and, for samplers that evaluate the model more than once per step (Heun, dpm_2, the 2S
  family), the sigma of each call (one read per call, to find its step: `sampling_progress`).
- `interval`: a full call every `interval` steps from the window's start (DeepCache's schedule); 1 never skips.
  A schedule: nothing is read from the device.
- `taylor`: the `interval` schedule, but a skipped call extrapolates `d` to first order from the last two full
  steps (TaylorSeer, order 1) instead of reusing it; with one full step it reuses.
All modes skip only inside [start, end) (shares of the steps) and at most `max_consecutive` calls in a row.

Hooks: one `APPLY_MODEL` wrapper and one `OUTER_SAMPLE` wrapper (state reset per run), keyed
`comfy_accel.step_cache`. APPLY_MODEL and not DIFFUSION_MODEL: the compile lane (Accelerate Model) swaps the
diffusion model for compiled code inside its own APPLY_MODEL wrapper and refuses other DIFFUSION_MODEL wrappers
(their step logic would be frozen into a trace), so at this level the compiled model is simply the executor a
full call runs and a skipped call never enters, in either order of the two nodes. The step of a call comes from
`sampling_progress` as DeepCache takes it. Entries are keyed by batch composition (the conds' uuids, else
`cond_or_uncond`), shape, dtype and device: CFG Cutoff's switch from batch 2 to batch 1 starts a fresh entry and
never mixes caches; a new run (prompt, LoRA, model) starts with none.

DeepCache stays its own node: it skips the deep blocks of an SD UNet inside every call (a different trade, and
workflows use it); both take the step the same way (`sampling_progress`) and may be stacked.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from . import events, options
from .base import AcceleratorInputError, AcceleratorSpec, Availability, wrapper_attribute
from .sampling_progress import install_step_tracking, step_of, tracked_step

log = logging.getLogger("comfy_accel")
WRAPPER_KEY = "comfy_accel.step_cache"
_STATE_IDS = itertools.count(1)


@dataclass
class StepCacheConfig:
    cache_mode: str = options.STEP_CACHE_MODES[0]
    threshold: float = options.STEP_CACHE_THRESHOLD.default       # adaptive: accumulated relative change
    interval: int = options.STEP_CACHE_INTERVAL.default           # interval/taylor: a full call every N steps
    start: float = options.STEP_CACHE_START.default               # share of the steps before which all run
    end: float = options.STEP_CACHE_END.default                   # share of the steps from which all run
    max_consecutive: int = options.STEP_CACHE_MAX_CONSECUTIVE.default
    node_id: str | None = None

    def __post_init__(self):
        self.cache_mode = options.parse_step_cache_mode(self.cache_mode)
        self.threshold = options.STEP_CACHE_THRESHOLD.parse("threshold", self.threshold)
        self.interval = options.STEP_CACHE_INTERVAL.parse("interval", self.interval)
        self.start = options.STEP_CACHE_START.parse("start", self.start)
        self.end = options.STEP_CACHE_END.parse("end", self.end)
        self.max_consecutive = options.STEP_CACHE_MAX_CONSECUTIVE.parse("max_consecutive", self.max_consecutive)
        if self.end < self.start:
            raise AcceleratorInputError(f"end ({self.end:g}) must not be below start ({self.start:g})")

    def window(self, total: int) -> tuple[int, int]:
        """The steps [first, stop) in which calls may be skipped."""
        return round(total * self.start), round(total * self.end)

    def settings(self) -> dict:
        return {"cache_mode": self.cache_mode, "threshold": self.threshold, "interval": self.interval,
                "start": self.start, "end": self.end, "max_consecutive": self.max_consecutive}

    def describe(self) -> str:
        rule = f"threshold {self.threshold:g}" if self.cache_mode == "adaptive" else f"interval {self.interval}"
        return f"{self.cache_mode}, {rule}, steps {self.start:g}-{self.end:g}, max {self.max_consecutive} in a row"


def _mean_abs(tensor):
    return tensor.float().abs().mean()   # stays on the device: read (lagged) through LaggedScalars


class LaggedScalars:
    """Device scalars queued now and read later: a non-blocking copy into pinned host memory and a CUDA event
    (on a CPU the values are simply kept). Read once later work was queued behind them, the read does not
    wait for the newest model call."""

    def __init__(self, values):
        import torch

        values = values.detach().float()
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values.clone()

    def read(self) -> list[float]:
        return read_host(self)


def read_host(lagged: LaggedScalars) -> list[float]:
    """The one place the step cache reads numbers from the device (a test counts the calls)."""
    if lagged.event is not None:
        lagged.event.synchronize()
    return lagged.host.tolist()


class CacheEntry:
    """One batch composition's cache in one run: the last two full calls (step, sigma, d) and the skip
    bookkeeping. Host-agnostic: `d` is the derivative the sampler integrates (the ComfyUI face) or the UNet's
    eps output (the WebUI face), `sigma` a host float.

    The decision (`skip`) and the prediction (`predict`) are pure functions of what was recorded, so a test can
    drive them with sequences whose changes it sets.
    """

    def __init__(self):
        self.full: list[tuple] = []   # (step, sigma, d) of the last two full calls, oldest first
        self.full_calls = 0           # full calls recorded
        self.rates: list[tuple[int, float, LaggedScalars]] = []   # adaptive: (full call index, |d sigma|,
        #                                                               [mean|d - d_prev|, mean|d_prev|])
        self.k: float | None = None   # adaptive: prediction change per unit of input change
        self.consecutive = 0

    def skip(self, config: StepCacheConfig, step: int, total: int, sigma: float | None = None) -> bool:
        """Whether the call at `step` (of `total`, at host float `sigma`) reuses the cache."""
        decided = self._decide(config, step, total, sigma)
        self.consecutive = self.consecutive + 1 if decided else 0
        return decided

    def _decide(self, config, step, total, sigma) -> bool:
        first, stop = config.window(total)
        if not self.full or not first <= step < stop or self.consecutive >= config.max_consecutive:
            return False
        if config.cache_mode != "adaptive":
            # the scheduled full step's other evaluations (Heun) run too
            return config.interval > 1 and (step - first) % config.interval != 0 and step != self.full[-1][0]
        self._settle_rates()
        full_sigma = self.full[-1][1]
        if self.k is None or sigma is None or full_sigma is None:
            return False
        return self.k * abs(full_sigma - sigma) < config.threshold

    def _settle_rates(self) -> None:
        """Reads every rate queued before the newest full call (that call was queued behind it)."""
        while self.rates and self.rates[0][0] < self.full_calls - 1:
            _, sigma_travelled, lagged = self.rates.pop(0)
            change_d, previous_d = lagged.read()
            change_x = sigma_travelled * previous_d   # mean|x1 - x0| of the Euler steps between the two
            self.k = change_d / change_x if change_x > 0 else None

    def record(self, step: int, sigma: float | None, d, measure: bool = False) -> None:
        """A full call's derivative at host float `sigma` (the newest replaces one of the same step: Heun's
        second call); `measure` (adaptive) queues the rate k between it and the previous full call. `d` is kept:
        the caller passes a tensor no later call overwrites."""
        import torch

        if self.full and self.full[-1][0] == step:
            self.full.pop()
            self.rates = [r for r in self.rates if r[0] != self.full_calls - 1]
            self.full_calls -= 1
        previous_sigma = self.full[-1][1] if self.full else None
        # a rate needs sigma travelled: two full calls at one sigma (the WebUI's Heun) give none, k keeps its value
        if measure and sigma is not None and previous_sigma is not None and previous_sigma != sigma:
            previous_d = self.full[-1][2]
            if previous_d.shape == d.shape:
                self.rates.append((self.full_calls, abs(self.full[-1][1] - sigma), LaggedScalars(torch.stack(
                    [_mean_abs(d - previous_d), _mean_abs(previous_d)]))))
        self.full = [*self.full[-1:], (step, sigma, d)]
        self.full_calls += 1

    def predict(self, config: StepCacheConfig, step: int):
        """The derivative a skipped call at `step` uses: the last one, or (taylor) its first-order extrapolation."""
        newest_step, _, newest = self.full[-1]
        if config.cache_mode != "taylor" or len(self.full) < 2:
            return newest
        older_step, _, older = self.full[0]
        return newest + (newest - older) * ((step - newest_step) / (newest_step - older_step))


class StepCacheState:
    """Everything one patched model keeps: the entries of the current run and its counts."""

    def __init__(self, config: StepCacheConfig):
        self.config = config
        self.token = next(_STATE_IDS)
        self.run = 0
        self.last_run: dict = {}
        self.reset()

    def reset(self) -> None:
        self.entries: dict[tuple, CacheEntry] = {}
        self._schedule_ref = self._schedule_cpu = None
        self.counts = {"ran": 0, "skipped": 0}
        self.steps_seen: set[int] = set()
        self.steps_run: set[int] = set()

    def step(self, transformer_options: dict) -> tuple[int, int, float | None] | None:
        """(step, total, sigma) of this call: the step from the callback's count (no sync), else from the sigma's
        place in the schedule (one read per call); the sigma as a host float where the adaptive rule needs it."""
        sample_sigmas, sigmas = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
        if sample_sigmas is None or sigmas is None:
            return None
        tracked = tracked_step(transformer_options, sample_sigmas)
        if tracked is not None and self.config.cache_mode != "adaptive":
            return (*tracked, None)
        schedule = self.schedule_on_host(sample_sigmas)
        if tracked is not None:
            return (*tracked, schedule[tracked[0]])
        sigma = float(sigmas.detach().max())   # the step of a call of a many-evaluation sampler: one read
        return (*step_of(sigma, self._schedule_cpu), sigma)

    def schedule_on_host(self, sample_sigmas) -> list[float]:
        if sample_sigmas is not self._schedule_ref:  # once per run: the schedule on the CPU (one read)
            self._schedule_ref = sample_sigmas
            self._schedule_cpu = sample_sigmas.detach().float().cpu()
            self._schedule_list = self._schedule_cpu.tolist()
        return self._schedule_list

    # -- the APPLY_MODEL wrapper body ---------------------------------------------------------------------------
    def apply_model(self, executor, x, t, args, kwargs):
        transformer_options = kwargs.get("transformer_options")
        if transformer_options is None:
            transformer_options = args[3] if len(args) > 3 and isinstance(args[3], dict) else {}
        position = self.step(transformer_options)
        if position is None:
            return self._run(executor, x, t, args, kwargs, None, None)
        step, total, sigma_host = position
        self.steps_seen.add(step)
        chunks = tuple(transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or (None,))
        key = (chunks, tuple(x.shape), x.dtype, x.device)
        entry = self.entries.setdefault(key, CacheEntry())
        sigma = t.reshape(t.shape[:1] + (1,) * (x.ndim - 1)).float()
        if entry.skip(self.config, step, total, sigma_host):
            self.counts["skipped"] += 1
            return (x.float() - sigma * entry.predict(self.config, step)).to(x.dtype)
        return self._run(executor, x, t, args, kwargs, entry, (step, sigma_host, sigma))

    def _run(self, executor, x, t, args, kwargs, entry, where):
        import torch

        denoised = executor(x, t, *args, **kwargs)
        self.counts["ran"] += 1
        if entry is not None:
            step, sigma_host, sigma = where
            self.steps_run.add(step)
            safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            entry.record(step, sigma_host, (x.float() - denoised.float()) / safe,
                         measure=self.config.cache_mode == "adaptive")
        return denoised

    # -- the OUTER_SAMPLE wrapper body --------------------------------------------------------------------------
    def sample(self, executor, args, kwargs):
        self.run += 1
        self.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            self.last_run = self.summary()
            if self.last_run["calls"]:
                events.notice("step_cache", self.last_run["line"], level="info", node_id=self.config.node_id,
                              summary=True)   # a run's summary: the browser shows it on the node's badge
            self.reset()   # drop the cached tensors with the run

    def summary(self) -> dict:
        steps = len(self.steps_seen)
        skipped = len(self.steps_seen - self.steps_run)
        calls = self.counts["ran"] + self.counts["skipped"]
        line = (f"skipped {skipped} of {steps} steps ({self.config.describe()}; "
                f"{self.counts['ran']} of {calls} model calls ran)")
        return {"steps": steps, "skipped_steps": skipped, "calls": calls, **self.counts, "line": line}


def step_cache_wrappers(config: StepCacheConfig):
    """The APPLY_MODEL and OUTER_SAMPLE wrappers sharing one StepCacheState, and that state."""
    state = StepCacheState(config)

    def step_cache_apply_model_wrapper(executor, x, t, *args, **kwargs):
        return state.apply_model(executor, x, t, args, kwargs)

    def step_cache_outer_sample_wrapper(executor, *args, **kwargs):
        return state.sample(executor, args, kwargs)

    step_cache_apply_model_wrapper.step_cache_state = state
    return step_cache_apply_model_wrapper, step_cache_outer_sample_wrapper, state


def apply(model, config: StepCacheConfig):
    """Returns a clone of the ModelPatcher that runs the step cache; the input model is not changed."""
    from comfy.patcher_extension import WrappersMP

    apply_model_wrapper, outer_wrapper, _ = step_cache_wrappers(config)
    patched = model.clone()
    for kind, wrapper in ((WrappersMP.APPLY_MODEL, apply_model_wrapper), (WrappersMP.OUTER_SAMPLE, outer_wrapper)):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    install_step_tracking(patched)   # the step of each call without waiting for the GPU (one-evaluation samplers)
    return patched


def step_cache_state(model) -> StepCacheState | None:
    """The state of the step cache a ModelPatcher carries (the last run's counts), or None."""
    return wrapper_attribute(model, "apply_model", WRAPPER_KEY, "step_cache_state")


def _available() -> Availability:
    return Availability(True, "any diffusion model, any sampler")


ACCELERATOR_SPECS = [
    AcceleratorSpec(
        name="step_cache", title="Step Cache",
        description="Skips whole model calls on steps where the prediction barely changes (adaptive), or on a "
                    "schedule (interval, taylor), reusing the last full call's prediction (lossy).",
        config=StepCacheConfig, available=_available, apply=apply, kind="model", lossless=False, order=45)
]
