"""The accelerators of the pack, named once (SPEC_MODULES), and what can run here.

Each module in SPEC_MODULES defines `ACCELERATOR_SPECS`; the rest of the package is infrastructure and is not
listed. The modules are imported one by one: one that fails to import (a broken optional library) shows up
as unavailable with the exception as its reason instead of breaking the pack.
"""
from __future__ import annotations

import importlib
import logging

from .base import AcceleratorSpec, Availability

log = logging.getLogger("comfy_accel")
# module names relative to this package; a new accelerator is added here
SPEC_MODULES = (
    "cfg_cutoff",
    "deepcache",
    "step_cache",
    "freeu",
    "taesd",
    "compile.inductor",
    "compile.onediff",
    "compile.stable_fast",
    "tensorrt",
)
_specs: dict[str, AcceleratorSpec] | None = None
_broken: dict[str, str] = {}


def _load() -> dict[str, AcceleratorSpec]:
    specs: dict[str, AcceleratorSpec] = {}
    for name in SPEC_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except Exception as exc:
            _broken[name] = f"{type(exc).__name__}: {exc}"
            log.warning("[comfy-accel] accelerator module %s failed to import: %s", name, exc)
            continue
        for spec in module.ACCELERATOR_SPECS:
            specs[spec.name] = spec
    return dict(sorted(specs.items(), key=lambda item: (item[1].order, item[0])))


def all_specs() -> dict[str, AcceleratorSpec]:
    global _specs
    if _specs is None:
        _specs = _load()
    return _specs


def get(name: str) -> AcceleratorSpec:
    specs = all_specs()
    if name not in specs:
        known = ", ".join(specs) or "none"
        raise KeyError(f"unknown accelerator {name!r}; known: {known}")
    return specs[name]


def availability(name: str) -> Availability:
    return get(name).available()


def status() -> list[dict]:
    """Every accelerator with availability and reason (what GET /accel/status returns)."""
    rows = [spec.status() for spec in all_specs().values()]
    for module, error in _broken.items():
        rows.append({"name": module, "title": module, "description": "", "kind": "model", "lossless": True,
                     "available": False, "reason": f"failed to import: {error}", "options": {}})
    return rows
