"""Finds every accelerator module in this package and reports what can run here.

Modules are imported one by one; a module that fails to import (a broken optional library) shows up
as unavailable with the exception as its reason instead of breaking the pack.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path

from .base import AcceleratorSpec, Availability

log = logging.getLogger("comfy_accel")
_SKIP = {"base", "events", "registry", "settings", "sampling_progress", "cache"}
_specs: dict[str, AcceleratorSpec] | None = None
_broken: dict[str, str] = {}


def _discover() -> dict[str, AcceleratorSpec]:
    specs: dict[str, AcceleratorSpec] = {}
    folder = Path(__file__).parent
    for info in pkgutil.iter_modules([str(folder)]):
        if info.name in _SKIP or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__package__}.{info.name}")
        except Exception as exc:
            _broken[info.name] = f"{type(exc).__name__}: {exc}"
            log.warning("[comfy-accel] accelerator module %s failed to import: %s", info.name, exc)
            continue
        for spec in getattr(module, "ACCELERATOR_SPECS", []):
            specs[spec.name] = spec
    return dict(sorted(specs.items(), key=lambda item: (item[1].order, item[0])))


def all_specs() -> dict[str, AcceleratorSpec]:
    global _specs
    if _specs is None:
        _specs = _discover()
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
