"""The one interface every accelerator implements, and the errors and checks they share.

An accelerator is a module in this package that defines `ACCELERATOR_SPECS`: a list of
`AcceleratorSpec` (name, config dataclass, `available()` → `Availability`, `apply(model, config)`).
`apply` takes a ComfyUI ModelPatcher (or VAE), clones it and attaches its work through the host's
official hooks; it never mutates its input. Nothing here imports a host at module level.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable


class AcceleratorInputError(ValueError):
    """Bad input for an accelerator (wrong model family, option out of range): the message says what to do."""


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (library missing, no GPU): the message is the reason."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class AcceleratorSpec:
    name: str                      # stable id used in workflows, settings and the cache key
    title: str                     # what a person reads
    description: str
    config: type                   # dataclass of the options
    available: Callable[[], Availability]
    apply: Callable[..., Any] | None = None
    kind: str = "model"            # "model" (MODEL → MODEL), "vae", or "backend" (chosen in Accelerate Model)
    lossless: bool = True          # same images as eager up to float noise
    order: int = 100               # display order in the panel
    # why applying it to its own output is not the same as applying it once ("" = it is: a second apply
    # replaces the first); tests/contract/test_accelerator_contract.py holds every spec to this
    not_idempotent: str = ""

    def status(self) -> dict:
        try:
            availability = self.available()
        except Exception as exc:  # a probe must never break the status page
            availability = Availability(False, f"availability check failed: {exc}")
        return {"name": self.name, "title": self.title, "description": self.description, "kind": self.kind,
                "lossless": self.lossless, "available": availability.ok, "reason": availability.reason,
                "options": config_schema(self.config)}


def config_schema(config_cls: type) -> dict:
    """The config dataclass as {field: default} (JSON-able), for the status route and the UIs."""
    if not dataclasses.is_dataclass(config_cls):
        return {}
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = None
        out[f.name] = value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else str(value)
    return out


def module_available(module: str, pip_name: str | None = None) -> Availability:
    """Whether an optional library can be imported, without importing it (cheap, never raises)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    # a namespace package is only a folder of that name on sys.path (tests/accelerators/tensorrt/ under pytest,
    # say), not the library: a real one has an origin
    found = spec is not None and spec.origin not in (None, "namespace")
    if found:
        return Availability(True, f"{module} found")
    return Availability(False, f"{pip_name or module} not installed (pip install {pip_name or module})")


def cuda_available() -> Availability:
    try:
        import torch
    except ImportError:
        return Availability(False, "torch not installed")
    if not torch.cuda.is_available():
        return Availability(False, "needs a CUDA GPU (none visible to torch)")
    return Availability(True, torch.cuda.get_device_name(0))


def is_sd_unet(diffusion_model) -> bool:
    """ComfyUI's openaimodel UNetModel (SD1.x, SD2.x, SDXL and their refiners/inpaint variants)."""
    return (type(diffusion_model).__name__ == "UNetModel"
            and all(hasattr(diffusion_model, a) for a in ("input_blocks", "middle_block", "output_blocks")))


def require_sd_unet(model, accelerator: str):
    """Returns the UNet of a ModelPatcher, or raises a clear error naming what was given instead."""
    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if diffusion_model is None:
        raise AcceleratorInputError(f"{accelerator} needs a MODEL (a diffusion model from a loader); "
                                    f"got {type(model).__name__}")
    if not is_sd_unet(diffusion_model):
        family = type(getattr(base, "model_config", None)).__name__
        raise AcceleratorInputError(
            f"{accelerator} works on SD1.x/SD2.x/SDXL UNet models; this MODEL is {family} "
            f"({type(diffusion_model).__name__}), which it cannot accelerate")
    return diffusion_model


def model_family(model) -> str:
    """'sd15', 'sd21', 'sdxl', ... from the host's model config class, lower-cased; 'unknown' otherwise."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__.lower() if config is not None else "unknown"


def check_range(name: str, value: float, low: float, high: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise AcceleratorInputError(f"{name} must be a number, got {value!r}") from None
    if not low <= value <= high:
        raise AcceleratorInputError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return value


def wrapper_attribute(model, wrapper_kind: str, key: str, attribute: str):
    """The `attribute` of the first wrapper a ModelPatcher carries under (wrapper kind, key) that has it, or None:
    how a node's state (its last run's counts) is found from the model it returned."""
    for wrapper in (getattr(model, "wrappers", {}) or {}).get(wrapper_kind, {}).get(key, []):
        value = getattr(wrapper, attribute, None)
        if value is not None:
            return value
    return None
