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

from .base import AcceleratorInputError

FALLBACK_POLICIES = ("eager", "error")
BACKENDS = ("auto", "inductor", "inductor+cudagraphs", "onediff", "stable-fast", "tensorrt", "eager")


@dataclass
class Settings:
    default_backend: str = "auto"
    fallback_policy: str = "eager"        # eager: run unaccelerated and say why; error: fail the prompt
    cache_budget_gb: float = 20.0         # disk budget of the artifact cache
    memory_budget_gb: float = 8.0         # live compiled objects/engines kept in memory

    def validate(self) -> "Settings":
        if self.default_backend not in BACKENDS:
            raise AcceleratorInputError(f"default_backend must be one of {', '.join(BACKENDS)}; "
                                        f"got {self.default_backend!r}")
        if self.fallback_policy not in FALLBACK_POLICIES:
            raise AcceleratorInputError(f"fallback_policy must be 'eager' or 'error'; got {self.fallback_policy!r}")
        for name, low, high in (("cache_budget_gb", 0.1, 10_000.0), ("memory_budget_gb", 0.1, 1_000.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise AcceleratorInputError(f"{name} must be a number between {low:g} and {high:g}; got {value!r}")
        return self


_lock = threading.Lock()
_settings = Settings()
_path: Path | None = None


def settings_path() -> Path | None:
    return _path


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
