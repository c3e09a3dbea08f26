"""Panel values → accelerator plan: what the WebUI accordion (and its settings section) ask for, validated.

Host-agnostic on purpose: the AUTOMATIC1111 shim (scripts/comfy_accel_webui.py) only reads its Gradio
components into a dict, calls `panel_to_plan`, and applies the plan through the WebUI's own hooks. Every
bad value (an unknown backend in pasted infotext, a cutoff of 150 %) becomes one AcceleratorInputError
whose message says what is allowed, before anything touches the model.

The plan lists the accelerators in the order DESIGN.md composes them (CFG cutoff → DeepCache → backend,
TAESD beside them on the VAE), and records in `notes` every choice it made for the user ("auto" picked
a backend, a backend missing here was replaced by eager), so the UI and the image metadata can say so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from . import settings as settings_module
from .base import AcceleratorInputError, Availability, BackendUnavailable, check_range

BACKEND_NAMES = ("inductor", "inductor+cudagraphs", "onediff", "stable-fast", "tensorrt")
PANEL_BACKENDS = ("auto", "eager", *BACKEND_NAMES)
# "auto" takes the first available of these; engines (tensorrt) need an explicit build, so never implicit.
AUTO_ORDER = ("inductor+cudagraphs", "stable-fast", "onediff", "inductor")
DYNAMIC_MODES = ("buckets", "static", "dynamic")
# The ranges of the panel's numbers: the one place the accordion's sliders, the API check and pasted infotext
# read them from (to be re-pointed at accelerators/options.py, the one source of option values, when it lands).
DEEPCACHE_INTERVAL = (1, 100)
DEEPCACHE_BRANCH = (0, 11)
CFG_CUTOFF_PERCENT = (0.0, 100.0)
INFOTEXT_PREFIX = "Accel"
# The accordion's components in the order the WebUI passes their values to the script (and the API's "args").
PANEL_ORDER = ("enabled", "backend", "deepcache", "deepcache_interval", "cfg_cutoff", "cfg_cutoff_percent", "taesd")


@dataclass
class PanelValues:
    """What the WebUI accordion shows, one field per component (defaults = the accordion's defaults)."""
    enabled: bool = False
    backend: str = "auto"
    dynamic: str = "buckets"
    deepcache: bool = False
    deepcache_interval: int = 3
    deepcache_branch: int = 0
    cfg_cutoff: bool = False
    cfg_cutoff_percent: float = 60.0
    taesd: bool = False
    fallback: str = ""                    # "" = the fallback policy from the settings

    @classmethod
    def from_dict(cls, values: dict) -> "PanelValues":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise AcceleratorInputError(f"unknown accelerator panel field(s): {', '.join(sorted(unknown))}; "
                                        f"known: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class PlanStep:
    accelerator: str      # registry spec name ("cfg_cutoff", "deepcache", "inductor", "taesd", ...)
    kind: str             # "model", "backend" or "vae"
    options: dict         # config fields for model/vae accelerators, the Accelerate Model options for backends


@dataclass
class AccelPlan:
    steps: list[PlanStep] = field(default_factory=list)
    backend: str = "eager"               # the backend that will run the UNet ("eager" = none)
    requested_backend: str = "eager"
    fallback: str = "eager"
    notes: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.steps)

    def step(self, accelerator: str) -> PlanStep | None:
        return next((s for s in self.steps if s.accelerator == accelerator), None)

    def infotext(self, ran: dict | None = None) -> dict:
        """Key/values for the WebUI's infotext (p.extra_generation_params); `infotext_to_panel` reads them back.

        `ran` says what actually ran in the job ({"backend", "deepcache", "cfg_cutoff", "taesd": bool, "notes"});
        an accelerator that was asked for but did not run is left out and said in "Accel note", so the image
        never claims what did not happen. Without `ran` (before the job) it is the plan itself.
        """
        if not self.steps and not (ran and ran.get("notes")):
            return {}
        ran = ran if ran is not None else {"backend": self.backend, "deepcache": bool(self.step("deepcache")),
                                           "cfg_cutoff": bool(self.step("cfg_cutoff")),
                                           "taesd": bool(self.step("taesd")), "notes": []}
        out = {f"{INFOTEXT_PREFIX} backend": ran["backend"]}
        if self.requested_backend != ran["backend"]:
            out[f"{INFOTEXT_PREFIX} requested"] = self.requested_backend
        cutoff = self.step("cfg_cutoff")
        if cutoff and ran.get("cfg_cutoff"):
            out[f"{INFOTEXT_PREFIX} CFG cutoff"] = f"{cutoff.options['cutoff_percent']:g}%"
        deepcache = self.step("deepcache")
        if deepcache and ran.get("deepcache"):
            out[f"{INFOTEXT_PREFIX} DeepCache"] = (f"interval {deepcache.options['cache_interval']}, "
                                                   f"branch {deepcache.options['cache_branch']}")
        if self.step("taesd") and ran.get("taesd"):
            out[f"{INFOTEXT_PREFIX} TAESD"] = "on"
        notes = [n for n in ran.get("notes", []) if n]
        if notes:
            out[f"{INFOTEXT_PREFIX} note"] = "; ".join(dict.fromkeys(notes))
        return out

    def as_metadata(self) -> dict:
        """The same facts as JSON (what ComfyUI's saved images carry under "comfy_accel")."""
        return {"backend": self.backend, "requested_backend": self.requested_backend, "fallback": self.fallback,
                "steps": [{"accelerator": s.accelerator, "kind": s.kind,
                           "options": {k: v for k, v in s.options.items() if k != "store"}} for s in self.steps],
                "notes": list(self.notes)}


def _registry_availability(name: str) -> Availability | None:
    """Availability of a registered accelerator, or None when this install has no such accelerator."""
    from . import registry

    spec = registry.all_specs().get(name)
    if spec is None:
        return None
    try:
        return spec.available()
    except Exception as exc:  # a probe must never break the mapping
        return Availability(False, f"availability check failed: {exc}")


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "on", "yes", "1")
    raise AcceleratorInputError(f"{name} must be on or off (true/false), got {value!r}")


def _as_int(name: str, value, low: int, high: int) -> int:
    number = check_range(name, value, low, high)
    if number != int(number):
        raise AcceleratorInputError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text not in allowed:
        raise AcceleratorInputError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    return text


def resolve_backend(requested: str, settings: settings_module.Settings,
                    availability: Callable[[str], Availability | None]) -> tuple[str, list[str]]:
    """'auto' → the settings' default backend, else the first available of AUTO_ORDER, else eager."""
    notes: list[str] = []
    if requested != "auto":
        return requested, notes
    default = settings.default_backend
    if default not in ("auto", "eager"):
        notes.append(f"auto: using the default backend from the settings ({default})")
        return default, notes
    if default == "eager":
        notes.append("auto: the settings' default backend is eager")
        return "eager", notes
    for name in AUTO_ORDER:
        found = availability(name)
        if found is not None and found.ok:
            notes.append(f"auto: picked {name} ({found.reason})" if found.reason else f"auto: picked {name}")
            return name, notes
    notes.append("auto: no compile backend is available here; running eager")
    return "eager", notes


def panel_to_plan(values: dict | PanelValues, settings: settings_module.Settings | None = None,
                  availability: Callable[[str], Availability | None] | None = None, store=None) -> AccelPlan:
    """Validates the panel values and returns the plan; raises AcceleratorInputError on any bad value.

    `availability(name)` answers for registered accelerators (None when the install lacks one); it defaults
    to the registry. A requested backend that cannot run here becomes eager with a note, or raises
    BackendUnavailable when the fallback policy is "error" (the same policy the ComfyUI nodes follow).
    """
    panel = values if isinstance(values, PanelValues) else PanelValues.from_dict(dict(values))
    settings = settings or settings_module.get_settings()
    availability = availability or _registry_availability

    enabled = _as_bool("enabled", panel.enabled)
    requested = _choice("backend", panel.backend, PANEL_BACKENDS)
    dynamic = _choice("dynamic shapes", panel.dynamic, DYNAMIC_MODES)
    fallback = _choice("fallback policy", panel.fallback or settings.fallback_policy,
                       settings_module.FALLBACK_POLICIES)
    use_deepcache = _as_bool("deepcache", panel.deepcache)
    interval = _as_int("deepcache_interval", panel.deepcache_interval, *DEEPCACHE_INTERVAL)
    branch = _as_int("deepcache_branch", panel.deepcache_branch, *DEEPCACHE_BRANCH)
    use_cutoff = _as_bool("cfg_cutoff", panel.cfg_cutoff)
    cutoff_percent = check_range("cfg_cutoff_percent", panel.cfg_cutoff_percent, *CFG_CUTOFF_PERCENT)
    use_taesd = _as_bool("taesd", panel.taesd)

    plan = AccelPlan(fallback=fallback, requested_backend=requested)
    if not enabled:
        return plan

    if use_cutoff:
        plan.steps.append(PlanStep("cfg_cutoff", "model", {"cutoff_percent": cutoff_percent,
                                                           "sigma_threshold": 0.0}))
    if use_deepcache:
        plan.steps.append(PlanStep("deepcache", "model", {"cache_interval": interval, "cache_branch": branch}))

    backend, notes = resolve_backend(requested, settings, availability)
    plan.notes.extend(notes)
    if backend != "eager":
        found = availability(backend)
        reason = None
        if found is None:
            reason = f"backend {backend} is not part of this install"
        elif not found.ok:
            reason = f"backend {backend} is unavailable: {found.reason}"
        if reason:
            if fallback == "error":
                raise BackendUnavailable(reason)
            plan.notes.append(f"{reason}; running eager")
            backend = "eager"
    plan.backend = backend
    if backend != "eager":
        plan.steps.append(PlanStep(backend, "backend", {"mode": "default", "dynamic": dynamic, "fallback": fallback,
                                                        "node_id": None, "store": store}))
    if use_taesd:
        plan.steps.append(PlanStep("taesd", "vae", {}))
    if not plan.steps:
        plan.notes.append("enabled, but nothing to apply (no backend and no accelerator chosen)")
    return plan


def infotext_to_panel(params: dict, errors: list | None = None) -> dict:
    """Reads the infotext keys that AccelPlan.infotext writes back into panel values (for "paste").

    Each field is read on its own: a bad one is left out (the others still paste) and its message goes to
    `errors`; without an `errors` list the first bad field raises AcceleratorInputError.
    """
    out: dict = {}
    backend = params.get(f"{INFOTEXT_PREFIX} requested") or params.get(f"{INFOTEXT_PREFIX} backend")
    if backend is None:
        return out
    found: list[str] = []

    def read(name, parse):
        try:
            out[name] = parse()
        except AcceleratorInputError as exc:
            found.append(f"pasted {INFOTEXT_PREFIX} {name.replace('_', ' ')}: {exc}")

    out["enabled"] = True
    read("backend", lambda: _choice("backend", backend, PANEL_BACKENDS))
    cutoff = params.get(f"{INFOTEXT_PREFIX} CFG cutoff")
    out["cfg_cutoff"] = cutoff is not None
    if cutoff is not None:
        read("cfg_cutoff_percent", lambda: check_range("cfg_cutoff_percent", str(cutoff).strip().rstrip("%"),
                                                       *CFG_CUTOFF_PERCENT))
    deepcache = params.get(f"{INFOTEXT_PREFIX} DeepCache")
    out["deepcache"] = deepcache is not None
    if deepcache is not None:
        fields = dict(part.strip().split(" ", 1) for part in str(deepcache).split(",") if " " in part.strip())
        read("deepcache_interval", lambda: _as_int("deepcache_interval", fields.get("interval", 3),
                                                   *DEEPCACHE_INTERVAL))
        read("deepcache_branch", lambda: _as_int("deepcache_branch", fields.get("branch", 0), *DEEPCACHE_BRANCH))
    out["taesd"] = params.get(f"{INFOTEXT_PREFIX} TAESD") == "on"
    if found and errors is None:
        raise AcceleratorInputError(found[0])
    if errors is not None:
        errors.extend(found)
    return out


def img2img_sigmas(sigmas, steps: int, t_enc: int) -> list[float]:
    """The part of a `steps`-step schedule an img2img (or hires) pass samples: A1111's k-diffusion sampler takes
    `sigmas[steps - t_enc - 1:]`, with (steps, t_enc) from `sd_samplers_common.setup_img2img_steps`."""
    values = [float(s) for s in sigmas]
    return values[steps - t_enc - 1:]


def setup_img2img_steps(steps: int, denoising_strength: float, fix_steps: bool, pass_steps: int | None = None):
    """(steps, t_enc) as A1111 v1.10's `sd_samplers_common.setup_img2img_steps` computes them (the shim calls the
    WebUI's own function; this copy of the arithmetic is what the CPU tests check the cutoff step against)."""
    if fix_steps or pass_steps is not None:
        requested = pass_steps or steps
        total = int(requested / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        return total, requested - 1
    return steps, int(min(denoising_strength, 0.999) * steps)


def cfg_cutoff_sigma(sigmas, cutoff_percent: float) -> float:
    """The WebUI's `s_min_uncond` that skips the uncond pass from the same step as ComfyUI's CFG cutoff.

    The WebUI skips when `sigma < s_min_uncond`; ComfyUI's cutoff skips from step round(total * p / 100).
    `sigmas` is the schedule including its final 0. Returns 0.0 (never skip) for 100 %.
    """
    cutoff_percent = check_range("cfg_cutoff_percent", cutoff_percent, 0.0, 100.0)
    values = [float(s) for s in sigmas]
    total = max(len(values) - 1, 1)
    step = round(total * cutoff_percent / 100.0)
    if step >= total:
        return 0.0
    return values[step] * (1.0 + 1e-4) + 1e-8


SETTING_TO_CORE = {"accel_default_backend": "default_backend", "accel_fallback_policy": "fallback_policy",
                   "accel_cache_budget_gb": "cache_budget_gb", "accel_memory_budget_gb": "memory_budget_gb"}
CACHE_FOLDER_SETTING = "accel_cache_folder"


def webui_setting_to_core(key: str, value, current: settings_module.Settings | None = None) -> tuple[str, object]:
    """One WebUI setting → (core settings field, validated value); ("cache_root", folder or None) for the cache
    folder. Checked on its own against the current settings, so one bad value never blocks another."""
    if key == CACHE_FOLDER_SETTING:
        return "cache_root", str(value or "").strip() or None
    if key not in SETTING_TO_CORE:
        raise AcceleratorInputError(f"unknown WebUI accelerator setting {key}; known: "
                                    f"{', '.join(sorted([*SETTING_TO_CORE, CACHE_FOLDER_SETTING]))}")
    name = SETTING_TO_CORE[key]
    if name in ("cache_budget_gb", "memory_budget_gb") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise AcceleratorInputError(f"{name} must be a number; got {value!r}") from None
    dataclasses.replace(current or settings_module.get_settings(), **{name: value}).validate()
    return name, value


def webui_settings_to_core(values: dict) -> dict:
    """Several WebUI settings at once: {"settings": {...}, "cache_root": str|None, "errors": {key: message}}.
    Each is validated alone; a bad one is reported under "errors" and left out, the others are kept."""
    out: dict = {"settings": {}, "cache_root": None, "errors": {}}
    for key, value in values.items():
        try:
            name, checked = webui_setting_to_core(key, value)
        except AcceleratorInputError as exc:
            out["errors"][key] = str(exc)
            continue
        if name == "cache_root":
            out["cache_root"] = checked
        else:
            out["settings"][name] = checked
    return out
