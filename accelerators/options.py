"""Every option a user can set, defined once: its allowed values, its default, and the one parser for it.

The ComfyUI node inputs, the settings (both hosts' panels), the WebUI accordion, `GET /accel/status` (under
"options") and web/accel.js (which reads that route) all derive from here; tests/test_options_consistency.py
fails when any of them lists a value this module does not.

The backend rule, the same in both hosts:
- a backend by name runs that backend (or eager with the reason, per the fallback policy);
- `default` is the settings' `default_backend` (itself `auto` until a user changes it);
- `auto` is the fastest backend *here*, whatever the settings say: on a CUDA GPU the first available of
  AUTO_ORDER, on a CPU eager (see `resolve_backend`), and the notice says which and why.
Nothing here imports a host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import AcceleratorInputError, Availability, check_range

AUTO, DEFAULT, EAGER = "auto", "default", "eager"
BACKENDS = ("inductor", "inductor+cudagraphs", "onediff", "stable-fast", "tensorrt")   # the named backends
BACKEND_CHOICES = (AUTO, DEFAULT, *BACKENDS, EAGER)        # Accelerate Model's input and the WebUI accordion
DEFAULT_BACKEND_CHOICES = (AUTO, *BACKENDS, EAGER)         # the settings' default_backend (never `default`)
# What `auto` tries on a CUDA GPU, fastest first (docs/benchmarks.md). TensorRT needs an engine build of
# minutes per profile, so it is never picked implicitly.
AUTO_ORDER = ("inductor+cudagraphs", "stable-fast", "onediff", "inductor")

FALLBACKS = ("eager", "error")                  # eager: run unaccelerated and say why; error: fail the prompt
FALLBACK_CHOICES = (DEFAULT, *FALLBACKS)        # node inputs: `default` follows the settings
FALLBACK_TEXT = {"eager": "run eager and say why", "error": "fail the prompt"}
DYNAMIC = ("buckets", "static", "dynamic")      # one graph per shape bucket / the first shape only / shape-generic
MODES = ("default", "max-autotune")
SCOPES = ("auto", "whole", "blocks")            # what one compile covers: auto = SD UNets whole, DiTs block by block
# the linear layers' arithmetic in the compiled model: auto = the model's dtype; fp8 = e4m3 weights and
# activations with row-wise scales (compile/fp8.py), on GPUs with fp8 tensor cores
PRECISIONS = ("auto", "fp8")


@dataclass(frozen=True)
class Range:
    """A numeric option: bounds, default, and whether it must be a whole number."""
    low: float
    high: float
    default: float
    whole: bool = False

    def parse(self, name: str, value) -> float | int:
        number = check_range(name, value, self.low, self.high)
        if not self.whole:
            return number
        if isinstance(value, bool) or number != int(number):
            raise AcceleratorInputError(f"{name} must be a whole number, got {value!r}")
        return int(number)

    def widget(self, step: float = 1.0) -> dict:
        """The bounds as a ComfyUI INT/FLOAT input spec."""
        return {"default": self.default, "min": self.low, "max": self.high, "step": step}

    def as_dict(self) -> dict:
        return {"min": self.low, "max": self.high, "default": self.default, "whole": self.whole}


# DeepCache. The core allowed 1..1000, the node and the WebUI mapping 1..100, the WebUI slider 1..20: 100 is
# the widest any face offered, and a larger interval means the same as one at least the step count (only the
# first scheduled step full), so nothing is lost.
DEEPCACHE_INTERVAL = Range(1, 100, 3, whole=True)
# The branch indexes a skip connection; the largest SD-family UNet (SD1.x/2.x) has 12, so 0..11 (the node's
# range; the core's 64 admitted nothing more). The per-model limit (SDXL: 9) is checked when it is applied.
DEEPCACHE_BRANCH = Range(0, 11, 0, whole=True)
PERCENT = Range(0.0, 100.0, 0.0)                 # start/end percent of the steps a step accelerator covers
# Step Cache (step_cache.py): which rule picks the skipped steps, and its knobs. The threshold is the accumulated
# relative change of the model's prediction EasyCache allows (its default 0.2); 0 never skips. start/end are
# shares of the steps (EasyCache's 0.15/0.95: the first steps lay out the image, the last ones sharpen it).
STEP_CACHE_MODES = ("adaptive", "interval", "taylor")
STEP_CACHE_THRESHOLD = Range(0.0, 5.0, 0.2)
STEP_CACHE_INTERVAL = Range(1, 100, 2, whole=True)          # a full step every N (interval, taylor); 1 = off
STEP_CACHE_START = Range(0.0, 1.0, 0.15)
STEP_CACHE_END = Range(0.0, 1.0, 0.95)
STEP_CACHE_MAX_CONSECUTIVE = Range(1, 100, 3, whole=True)   # skipped steps in a row before a full one
# CFG cutoff: 60 % was the default of both faces (the core said 50): past ~60 % the uncond is rarely visible.
CFG_CUTOFF_PERCENT = Range(0.0, 100.0, 60.0)
# Up to 1e4 (the core's bound, not the node's 1000): zero-terminal-SNR schedules start near sigma 4.5e3.
SIGMA_THRESHOLD = Range(0.0, 1e4, 0.0)
CACHE_BUDGET_GB = Range(0.1, 10_000.0, 20.0)      # disk budget of the artifact cache
MEMORY_BUDGET_GB = Range(0.1, 1_000.0, 8.0)       # live compiled objects and engines kept in memory


def parse_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed` (case and surrounding spaces ignored); else the error lists them."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in allowed:
        raise AcceleratorInputError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    return text


SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                "off": False}   # the on/off words of every face and environment variable (any case)


def parse_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    found = SWITCH_WORDS.get(value.strip().lower()) if isinstance(value, str) else None
    if found is None:
        raise AcceleratorInputError(f"{name} must be on or off (true/false), got {value!r}")
    return found


def parse_backend(value) -> str:
    return parse_choice("backend", value, BACKEND_CHOICES)


def parse_default_backend(value) -> str:
    return parse_choice("default_backend", value, DEFAULT_BACKEND_CHOICES)


def parse_fallback(value, settings=None) -> str:
    """'eager' or 'error'; `default`, "" and None mean the settings' fallback policy."""
    if value in (None, "", DEFAULT):
        if settings is None:
            from . import settings as settings_module

            settings = settings_module.get_settings()
        value = settings.fallback_policy
    return parse_choice("fallback policy", value, FALLBACKS)


def parse_dynamic(value) -> str:
    return parse_choice("dynamic shapes", value or DYNAMIC[0], DYNAMIC)


def parse_mode(value) -> str:
    return parse_choice("mode", value or MODES[0], MODES)


def parse_scope(value) -> str:
    return parse_choice("scope", value or SCOPES[0], SCOPES)


def parse_precision(value) -> str:
    return parse_choice("precision", value or PRECISIONS[0], PRECISIONS)


def parse_step_cache_mode(value) -> str:
    return parse_choice("cache_mode", value or STEP_CACHE_MODES[0], STEP_CACHE_MODES)


def parse_backend_options(options: dict | None, settings=None) -> tuple[str, str, str]:
    """(mode, dynamic, fallback) of an Accelerate Model options dict, validated; absent = the defaults."""
    options = options or {}
    return (parse_mode(options.get("mode")), parse_dynamic(options.get("dynamic")),
            parse_fallback(options.get("fallback"), settings))


@dataclass(frozen=True)
class BackendChoice:
    backend: str        # what will run the UNet: one of BACKENDS, or "eager"
    note: str = ""      # why this one ("" for a backend named explicitly)
    missing: str = ""   # set when eager is a fallback (auto found nothing on a GPU), not the fastest choice


def registry_availability(name: str) -> Availability | None:
    from . import registry

    spec = registry.all_specs().get(name)
    if spec is None:
        return None
    try:
        return spec.available()
    except Exception as exc:  # a probe must never break the choice
        return Availability(False, f"availability check failed: {exc}")


def resolve_backend(requested, settings=None, availability: Callable[[str], Availability | None] | None = None,
                    gpu: Availability | None = None) -> BackendChoice:
    """The backend that runs for `requested` (see the module docstring for the rule).

    `availability(name)` answers for one backend (None: not part of this install; default: the registry);
    `gpu` says whether a CUDA GPU is here (default: `base.cuda_available()`).
    """
    requested = parse_backend(requested)
    note = ""
    if requested == DEFAULT:
        if settings is None:
            from . import settings as settings_module

            settings = settings_module.get_settings()
        requested = parse_default_backend(settings.default_backend)
        note = f"default backend from the settings: {requested}"
    if requested != AUTO:
        return BackendChoice(requested, note)
    prefix = f"{note}; " if note else ""
    if gpu is None:
        from .base import cuda_available

        gpu = cuda_available()
    if not gpu:
        # On a CPU every backend but inductor needs CUDA, and inductor's compile costs more than it saves
        # (docs/benchmarks.md, "`auto` on a CPU").
        return BackendChoice(EAGER, f"{prefix}auto picked eager: torch sees no CUDA GPU here, and compiling on "
                                    f"a CPU costs more time than it saves")
    availability = availability or registry_availability
    skipped = []
    for name in AUTO_ORDER:
        found = availability(name)
        if found is not None and found.ok:
            why = f" ({found.reason})" if found.reason else ""
            passed = f"; not {', '.join(skipped)}" if skipped else ""
            return BackendChoice(name, f"{prefix}auto picked {name}, the fastest available here{why}{passed}")
        skipped.append(f"{name}: {found.reason if found is not None else 'not part of this install'}")
    reason = "no compile backend can run here (" + "; ".join(skipped) + ")"
    return BackendChoice(EAGER, f"{prefix}auto: {reason}", missing=reason)


def describe() -> dict:
    """Every option as JSON (GET /accel/status → "options"): what the browser and other clients offer."""
    return {
        "backend": {"choices": list(BACKEND_CHOICES), "default": AUTO, "auto_order": list(AUTO_ORDER)},
        "mode": {"choices": list(MODES), "default": MODES[0]},
        "dynamic": {"choices": list(DYNAMIC), "default": DYNAMIC[0]},
        "scope": {"choices": list(SCOPES), "default": SCOPES[0]},
        "precision": {"choices": list(PRECISIONS), "default": PRECISIONS[0]},
        "fallback": {"choices": list(FALLBACK_CHOICES), "default": DEFAULT},
        "deepcache": {"cache_interval": DEEPCACHE_INTERVAL.as_dict(), "cache_branch": DEEPCACHE_BRANCH.as_dict(),
                      "start_percent": PERCENT.as_dict(), "end_percent": {**PERCENT.as_dict(), "default": 100.0}},
        "step_cache": {"cache_mode": {"choices": list(STEP_CACHE_MODES), "default": STEP_CACHE_MODES[0]},
                       "threshold": STEP_CACHE_THRESHOLD.as_dict(), "interval": STEP_CACHE_INTERVAL.as_dict(),
                       "start": STEP_CACHE_START.as_dict(), "end": STEP_CACHE_END.as_dict(),
                       "max_consecutive": STEP_CACHE_MAX_CONSECUTIVE.as_dict()},
        "cfg_cutoff": {"cutoff_percent": CFG_CUTOFF_PERCENT.as_dict(), "sigma_threshold": SIGMA_THRESHOLD.as_dict()},
        "settings": {
            "default_backend": {"choices": [{"value": v, "text": v} for v in DEFAULT_BACKEND_CHOICES],
                                "default": AUTO},
            "fallback_policy": {"choices": [{"value": v, "text": FALLBACK_TEXT[v]} for v in FALLBACKS],
                                "default": FALLBACKS[0]},
            "cache_budget_gb": CACHE_BUDGET_GB.as_dict(),
            "memory_budget_gb": MEMORY_BUDGET_GB.as_dict(),
            **_switches(),
        },
    }


def _switches() -> dict:
    """The settings' on/off switches (settings.ENV_OVERRIDES), with their defaults."""
    from . import settings as settings_module

    defaults = settings_module.Settings()
    return {name: {"default": getattr(defaults, name)} for name in settings_module.ENV_OVERRIDES}
