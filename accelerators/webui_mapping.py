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

from . import options
from . import settings as settings_module
from .base import AcceleratorInputError, Availability, BackendUnavailable
# every value and range comes from options.py, like the ComfyUI nodes'
from .options import (BACKEND_CHOICES, CFG_CUTOFF_PERCENT, DEEPCACHE_BRANCH, DEEPCACHE_INTERVAL, DEFAULT,
                      DYNAMIC, PRECISIONS, STEP_CACHE_END, STEP_CACHE_INTERVAL, STEP_CACHE_MAX_CONSECUTIVE,
                      STEP_CACHE_MODES, STEP_CACHE_START, STEP_CACHE_THRESHOLD, parse_bool, parse_choice,
                      parse_fallback, parse_precision, registry_availability, resolve_backend)

PANEL_BACKENDS = BACKEND_CHOICES
INFOTEXT_PREFIX = "Accel"
# The accordion's components in the order the WebUI passes their values to the script (and the API's "args"); a
# component added later goes last, so that the "args" of an older API caller keep their meaning.
PANEL_ORDER = ("enabled", "backend", "deepcache", "deepcache_interval", "cfg_cutoff", "cfg_cutoff_percent", "taesd",
               "step_cache", "step_cache_mode", "step_cache_threshold", "step_cache_interval", "precision",
               "step_cache_start", "step_cache_end", "step_cache_max_consecutive")


@dataclass
class PanelValues:
    """What the WebUI accordion shows, one field per component (defaults = the accordion's defaults)."""
    enabled: bool = False
    backend: str = DEFAULT                # the settings' default backend (`auto` there until changed)
    dynamic: str = DYNAMIC[0]
    deepcache: bool = False
    deepcache_interval: int = DEEPCACHE_INTERVAL.default
    deepcache_branch: int = DEEPCACHE_BRANCH.default
    cfg_cutoff: bool = False
    cfg_cutoff_percent: float = CFG_CUTOFF_PERCENT.default
    taesd: bool = False
    step_cache: bool = False
    step_cache_mode: str = STEP_CACHE_MODES[0]
    step_cache_threshold: float = STEP_CACHE_THRESHOLD.default
    step_cache_interval: int = STEP_CACHE_INTERVAL.default
    step_cache_start: float = STEP_CACHE_START.default
    step_cache_end: float = STEP_CACHE_END.default
    step_cache_max_consecutive: int = STEP_CACHE_MAX_CONSECUTIVE.default
    fallback: str = ""                    # "" = the fallback policy from the settings
    precision: str = PRECISIONS[0]        # the compiled UNet's linear layers: the model's dtype or fp8

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

    @property
    def uses_unet(self) -> bool:
        """Whether the job runs the UNet through the pack's SdUnet (a backend, DeepCache or Step Cache)."""
        return self.backend != "eager" or self.step("deepcache") is not None or self.step("step_cache") is not None

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
                                           "taesd": bool(self.step("taesd")),
                                           "step_cache": bool(self.step("step_cache")), "notes": []}
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
        if ran.get("precision", PRECISIONS[0]) != PRECISIONS[0]:   # only what ran: fp8 layers in this job
            out[f"{INFOTEXT_PREFIX} precision"] = ran["precision"]
        out.update(_step_cache_infotext(self.step("step_cache"), ran.get("step_cache")))
        # one line each, kept short: an exception's text can run to pages, and a newline would end the infotext
        notes = [_one_line(n) for n in ran.get("notes", []) if n and n.strip()]
        if notes:
            out[f"{INFOTEXT_PREFIX} note"] = "; ".join(dict.fromkeys(notes))
        return out

    def as_metadata(self) -> dict:
        """The same facts as JSON (what ComfyUI's saved images carry under "comfy_accel")."""
        return {"backend": self.backend, "requested_backend": self.requested_backend, "fallback": self.fallback,
                "steps": [{"accelerator": s.accelerator, "kind": s.kind,
                           "options": {k: v for k, v in s.options.items() if k != "store"}} for s in self.steps],
                "notes": list(self.notes)}


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def panel_to_plan(values: dict | PanelValues, settings: settings_module.Settings | None = None,
                  availability: Callable[[str], Availability | None] | None = None, store=None,
                  gpu: Availability | None = None) -> AccelPlan:
    """Validates the panel values and returns the plan; raises AcceleratorInputError on any bad value.

    `availability(name)` answers for registered accelerators (None when the install lacks one); it defaults
    to the registry; `gpu` whether a CUDA GPU is here (default: torch's answer). A requested backend that
    cannot run here becomes eager with a note, or raises BackendUnavailable when the fallback policy is "error"
    (the same policy the ComfyUI nodes follow).
    """
    panel = values if isinstance(values, PanelValues) else PanelValues.from_dict(dict(values))
    settings = settings or settings_module.get_settings()
    availability = availability or registry_availability

    enabled = parse_bool("enabled", panel.enabled)
    requested = parse_choice("backend", panel.backend, PANEL_BACKENDS)
    dynamic = parse_choice("dynamic shapes", panel.dynamic, DYNAMIC)
    fallback = parse_fallback(panel.fallback, settings)
    use_deepcache = parse_bool("deepcache", panel.deepcache)
    interval = DEEPCACHE_INTERVAL.parse("deepcache_interval", panel.deepcache_interval)
    branch = DEEPCACHE_BRANCH.parse("deepcache_branch", panel.deepcache_branch)
    use_cutoff = parse_bool("cfg_cutoff", panel.cfg_cutoff)
    cutoff_percent = CFG_CUTOFF_PERCENT.parse("cfg_cutoff_percent", panel.cfg_cutoff_percent)
    use_taesd = parse_bool("taesd", panel.taesd)
    precision = parse_precision(panel.precision)
    step_cache = _step_cache_options(panel)

    plan = AccelPlan(fallback=fallback, requested_backend=requested)
    if not enabled:
        return plan

    if use_cutoff:
        plan.steps.append(PlanStep("cfg_cutoff", "model", {"cutoff_percent": cutoff_percent,
                                                           "sigma_threshold": 0.0}))
    if use_deepcache:
        plan.steps.append(PlanStep("deepcache", "model", {"cache_interval": interval, "cache_branch": branch}))
    if step_cache is not None:
        plan.steps.append(PlanStep("step_cache", "model", step_cache))

    choice = resolve_backend(requested, settings, availability, gpu)
    backend = choice.backend
    if choice.note:
        plan.notes.append(choice.note)
    if choice.missing and fallback == "error":
        raise BackendUnavailable(choice.missing)
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
                                                        "node_id": None, "store": store, "precision": precision}))
    elif precision != PRECISIONS[0]:
        plan.notes.append(f"precision {precision} runs in a compiled UNet; with no backend the model's dtype runs")
    if use_taesd:
        plan.steps.append(PlanStep("taesd", "vae", {}))
    if not plan.steps and not plan.notes:   # (a backend missing here has its own note)
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
    read("backend", lambda: parse_choice("backend", backend, PANEL_BACKENDS))
    cutoff = params.get(f"{INFOTEXT_PREFIX} CFG cutoff")
    out["cfg_cutoff"] = cutoff is not None
    if cutoff is not None:
        read("cfg_cutoff_percent",
             lambda: CFG_CUTOFF_PERCENT.parse("cfg_cutoff_percent", str(cutoff).strip().rstrip("%")))
    deepcache = params.get(f"{INFOTEXT_PREFIX} DeepCache")
    out["deepcache"] = deepcache is not None
    if deepcache is not None:
        fields = dict(part.strip().split(" ", 1) for part in str(deepcache).split(",") if " " in part.strip())
        read("deepcache_interval", lambda: DEEPCACHE_INTERVAL.parse(
            "deepcache_interval", fields.get("interval", DEEPCACHE_INTERVAL.default)))
        read("deepcache_branch", lambda: DEEPCACHE_BRANCH.parse("deepcache_branch",
                                                                fields.get("branch", DEEPCACHE_BRANCH.default)))
    out["taesd"] = params.get(f"{INFOTEXT_PREFIX} TAESD") == "on"
    precision = params.get(f"{INFOTEXT_PREFIX} precision")
    if precision is not None:
        read("precision", lambda: parse_precision(precision))
    _step_cache_from_infotext(params.get(f"{INFOTEXT_PREFIX} Step Cache"), out, read)
    if found and errors is None:
        raise AcceleratorInputError(found[0])
    if errors is not None:
        errors.extend(found)
    return out


SETTING_TO_CORE = {"accel_default_backend": "default_backend", "accel_fallback_policy": "fallback_policy",
                   "accel_cache_budget_gb": "cache_budget_gb", "accel_memory_budget_gb": "memory_budget_gb",
                   # the compile lane's switches (settings.py); `preimport` is ComfyUI's start-up only, not listed
                   "accel_precompile": "precompile", "accel_channels_last": "channels_last"}
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
    if name in ("precompile", "channels_last"):
        value = options.parse_bool(name, value)
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


# ---- Step Cache (accelerators/webui_step_cache.py runs it) ------------------------------------------------------
def _step_cache_options(panel: PanelValues) -> dict | None:
    """The StepCacheConfig fields the panel asks for, or None when it is off; validated like the ComfyUI node's
    (each range under its panel name, then the config's own check that the window does not end before it starts)."""
    from .step_cache import StepCacheConfig

    if not parse_bool("step_cache", panel.step_cache):
        return None
    mode = parse_choice("step_cache_mode", panel.step_cache_mode, STEP_CACHE_MODES)
    config = StepCacheConfig(
        cache_mode=mode, threshold=STEP_CACHE_THRESHOLD.parse("step_cache_threshold", panel.step_cache_threshold),
        interval=STEP_CACHE_INTERVAL.parse("step_cache_interval", panel.step_cache_interval),
        start=STEP_CACHE_START.parse("step_cache_start", panel.step_cache_start),
        end=STEP_CACHE_END.parse("step_cache_end", panel.step_cache_end),
        max_consecutive=STEP_CACHE_MAX_CONSECUTIVE.parse("step_cache_max_consecutive",
                                                         panel.step_cache_max_consecutive))
    return config.settings()


def _step_cache_infotext(step: PlanStep | None, ran: str | bool | None) -> dict:
    """"Accel Step Cache": the mode and its value, the window and the most skips in a row (StepCacheConfig.describe's
    words), then what ran (`ran`: "skipped N of M steps"; True before the job: the plan alone); nothing where it did
    not run."""
    if step is None or not ran:
        return {}
    from .step_cache import StepCacheConfig

    done = f", {ran}" if isinstance(ran, str) else ""
    return {f"{INFOTEXT_PREFIX} Step Cache": StepCacheConfig(**step.options).describe() + done}


def _step_cache_from_infotext(text, out: dict, read: Callable) -> None:
    """The fields `_step_cache_infotext` writes; the window and the most in a row at options.py's defaults where the
    text has none (an image from before the panel had them ran with those)."""
    out["step_cache"] = text is not None
    if text is None:
        return
    parts = [part.strip() for part in str(text).split(",")]
    read("step_cache_mode", lambda: parse_choice("step_cache_mode", parts[0], STEP_CACHE_MODES))
    fields = dict(part.split(" ", 1) for part in parts[1:] if " " in part)
    if "threshold" in fields:
        read("step_cache_threshold", lambda: STEP_CACHE_THRESHOLD.parse("step_cache_threshold", fields["threshold"]))
    if "interval" in fields:
        read("step_cache_interval", lambda: STEP_CACHE_INTERVAL.parse("step_cache_interval", fields["interval"]))
    start, _, end = fields.get("steps", "").partition("-")
    read("step_cache_start", lambda: STEP_CACHE_START.parse("step_cache_start", start or STEP_CACHE_START.default))
    read("step_cache_end", lambda: STEP_CACHE_END.parse("step_cache_end", end or STEP_CACHE_END.default))
    most = fields.get("max", "").split(" ")[0]
    read("step_cache_max_consecutive", lambda: STEP_CACHE_MAX_CONSECUTIVE.parse(
        "step_cache_max_consecutive", most or STEP_CACHE_MAX_CONSECUTIVE.default))
