"""User settings shared by both hosts: default backend, fallback policy, cache budget.

The ComfyUI frontend's settings dialog and the WebUI's settings panel both write here (validated);
accelerators read `get_settings()`. Values persist as JSON beside the artifact cache so both hosts,
and a restarted server, see the same choices.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from . import options
from .base import AcceleratorInputError


@dataclass
class Settings:
    """The values and their bounds come from options.py (the one place the panels read them from too)."""
    default_backend: str = options.AUTO                             # what a node's `default` backend means
    fallback_policy: str = options.FALLBACKS[0]                     # eager: run unaccelerated and say why
    cache_budget_gb: float = options.CACHE_BUDGET_GB.default        # disk budget of the artifact cache
    memory_budget_gb: float = options.MEMORY_BUDGET_GB.default      # live compiled objects/engines in memory

    def validate(self) -> "Settings":
        for name, allowed in (("default_backend", options.DEFAULT_BACKEND_CHOICES),
                              ("fallback_policy", options.FALLBACKS)):
            if getattr(self, name) not in allowed:
                raise AcceleratorInputError(f"{name} must be one of {', '.join(allowed)}; "
                                            f"got {getattr(self, name)!r}")
        for name, bounds in (("cache_budget_gb", options.CACHE_BUDGET_GB),
                             ("memory_budget_gb", options.MEMORY_BUDGET_GB)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds.low <= value <= bounds.high:
                raise AcceleratorInputError(f"{name} must be a number between {bounds.low:g} and {bounds.high:g}; "
                                            f"got {value!r}")
        return self


_lock = threading.Lock()
_settings = Settings()
_path: Path | None = None


def load(path: Path | str | None) -> Settings:
    """Reads saved settings (a bad file is reported and ignored, never fatal)."""
    global _settings, _path
    _path = Path(path) if path else None
    if _path and _path.is_file():
        try:
            data = json.loads(_path.read_text())
            _settings = Settings(**{k: v for k, v in data.items() if k in _field_names()}).validate()
        except (ValueError, TypeError, AcceleratorInputError) as exc:
            import logging

            logging.getLogger("comfy_accel").warning("[comfy-accel] ignoring bad settings file %s: %s", _path, exc)
    return _settings


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings)}


def get_settings() -> Settings:
    return _settings


def update(values: dict) -> Settings:
    """Validates and applies a partial update; unknown keys and bad values raise AcceleratorInputError."""
    global _settings
    unknown = set(values) - _field_names()
    if unknown:
        raise AcceleratorInputError(f"unknown setting(s): {', '.join(sorted(unknown))}; "
                                    f"known: {', '.join(sorted(_field_names()))}")
    with _lock:
        candidate = dataclasses.replace(_settings, **values).validate()
        _settings = candidate
        if _path:
            _path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _path.with_suffix(".tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(candidate), indent=2))
            os.replace(tmp, _path)
    return candidate


def as_dict() -> dict:
    return dataclasses.asdict(_settings)
