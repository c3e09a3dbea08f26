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
  of its forward; TeaCache and MagCache need fitted per-model (per-step-count) tables. After two full calls,
  `k = mean|d1 - d0| / mean|x1 - x0|` says how much the prediction moves per unit of input change; each later
  call adds `k * mean|x_t - x_prev| / mean|d1|` (the estimated relative change of the prediction) to an
  accumulator, and the call is skipped while the accumulator stays under `threshold`. A full call resets it.
  Threshold 0 never skips. The estimate reads one number from the device per call (a sync), and a full
  call three.
- `interval`: a full call every `interval` steps from the window's start (DeepCache's schedule); 1 never skips.
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


def _mean_abs(tensor) -> float:
    return float(tensor.float().abs().mean())


class CacheEntry:
    """One batch composition's cache in one run: the last two full calls (step, x, d) and the skip bookkeeping.

    The decision (`skip`) and the prediction (`predict`) are pure functions of what was recorded, so a test can
    drive them with feature sequences whose changes it sets.
    """

    def __init__(self):
        self.full: list[tuple[int, object, object]] = []   # (step, x, d) of the last two full calls, oldest first
        self.x_prev = None          # the input of the previous call (skipped or not)
        self.k: float | None = None  # adaptive: prediction change per unit of input change
        self.scale = 0.0            # mean |d| of the newest full call
        self.accumulated = 0.0
        self.consecutive = 0

    def skip(self, config: StepCacheConfig, step: int, total: int, x) -> bool:
        """Whether the call at `step` (of `total`) with input `x` reuses the cache; updates the bookkeeping."""
        decided = self._decide(config, step, total, x)
        self.x_prev = x
        self.consecutive = self.consecutive + 1 if decided else 0
        return decided

    def _decide(self, config, step, total, x) -> bool:
        first, stop = config.window(total)
        if not self.full or not first <= step < stop or self.consecutive >= config.max_consecutive:
            return False
        if config.cache_mode != "adaptive":
            # the scheduled full step's other evaluations (Heun) run too
            return config.interval > 1 and (step - first) % config.interval != 0 and step != self.full[-1][0]
        if self.k is None or self.x_prev is None or x.shape != self.x_prev.shape:
            return False
        if self.scale == 0.0:
            return False
        self.accumulated += self.k * _mean_abs(x - self.x_prev) / self.scale
        return self.accumulated < config.threshold

    def record(self, step: int, x, d) -> None:
        """A full call's input and derivative (the newest replaces one of the same step: Heun's second call)."""
        if self.full and self.full[-1][0] == step:
            self.full.pop()
        if self.full:
            change = _mean_abs(x - self.full[-1][1])
            self.k = _mean_abs(d - self.full[-1][2]) / change if change > 0 else None
        self.full = [*self.full[-1:], (step, x, d)]
        self.scale = _mean_abs(d)   # read once per full call: a skip decision then costs one device read
        self.accumulated = 0.0

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

    def step(self, transformer_options: dict) -> tuple[int, int] | None:
        """(step, total) of this call: the callback's count (no sync), else the sigma's place in the schedule."""
        sample_sigmas, sigmas = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
        if sample_sigmas is None or sigmas is None:
            return None
        tracked = tracked_step(transformer_options, sample_sigmas)
        if tracked is not None:
            return tracked
        if sample_sigmas is not self._schedule_ref:  # once per run: the schedule on the CPU
            self._schedule_ref = sample_sigmas
            self._schedule_cpu = sample_sigmas.detach().float().cpu()
        return step_of(float(sigmas.detach().max()), self._schedule_cpu)

    # -- the APPLY_MODEL wrapper body ---------------------------------------------------------------------------
    def apply_model(self, executor, x, t, args, kwargs):
        transformer_options = kwargs.get("transformer_options")
        if transformer_options is None:
            transformer_options = args[3] if len(args) > 3 and isinstance(args[3], dict) else {}
        position = self.step(transformer_options)
        if position is None:
            return self._run(executor, x, t, args, kwargs, None, None)
        step, total = position
        self.steps_seen.add(step)
        chunks = tuple(transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or (None,))
        key = (chunks, tuple(x.shape), x.dtype, x.device)
        entry = self.entries.setdefault(key, CacheEntry())
        sigma = t.reshape(t.shape[:1] + (1,) * (x.ndim - 1)).float()
        if entry.skip(self.config, step, total, x):
            self.counts["skipped"] += 1
            return (x.float() - sigma * entry.predict(self.config, step)).to(x.dtype)
        return self._run(executor, x, t, args, kwargs, entry, (step, sigma))

    def _run(self, executor, x, t, args, kwargs, entry, where):
        import torch

        denoised = executor(x, t, *args, **kwargs)
        self.counts["ran"] += 1
        if entry is not None:
            step, sigma = where
            self.steps_run.add(step)
            safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
            entry.record(step, x, (x.float() - denoised.float()) / safe)
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
