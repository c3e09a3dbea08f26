"""User settings shared by both hosts: default backend, fallback policy, cache budgets, compile-lane switches.

The ComfyUI frontend's settings dialog and the WebUI's settings panel both write here (validated);
accelerators read `get_settings()`. Values persist as JSON beside the artifact cache so both hosts,
and a restarted server, see the same choices.

An on/off setting may be overridden for one process by its environment variable (`ENV_OVERRIDES`, e.g. for a
benchmark or CI run), read when the settings are loaded and parsed by `parse_switch`; the variable wins over
the saved value.
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
    """The choices and bounds come from options.py (the one place the panels read them from too)."""
    default_backend: str = options.AUTO                             # what a node's `default` backend means
    fallback_policy: str = options.FALLBACKS[0]                     # eager: run unaccelerated and say why
    cache_budget_gb: float = options.CACHE_BUDGET_GB.default        # disk budget of the artifact cache
    memory_budget_gb: float = options.MEMORY_BUDGET_GB.default      # live compiled objects/engines in memory
    # inductor+cudagraphs precompiles the whole UNet (compile/precompile.py), so that a new process loads it
    # without tracing; off: the compile-cache artifacts only
    precompile: bool = True
    channels_last: bool = True            # convolution weights kept channels-last on a GPU (compile/graphs.py)
    preimport: bool = True                # the compiler's modules imported at startup (compile/preimport.py)

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
        for name in ENV_OVERRIDES:
            if not isinstance(getattr(self, name), bool):
                raise AcceleratorInputError(f"{name} must be true or false; got {getattr(self, name)!r}")
        return self


# on/off settings an environment variable overrides for one process
ENV_OVERRIDES = {"precompile": "COMFY_ACCEL_PRECOMPILE", "channels_last": "COMFY_ACCEL_CHANNELS_LAST",
                 "preimport": "COMFY_ACCEL_PREIMPORT"}


def parse_switch(text: str) -> bool | None:
    """An on/off word (1/0, true/false, yes/no, on/off, any case) as a bool; None for anything else."""
    return options.SWITCH_WORDS.get(str(text).strip().lower())


def read_env_overrides(environ=None) -> dict[str, bool]:
    """{setting: value} for every override variable that is set to an on/off word (others are reported)."""
    environ = os.environ if environ is None else environ
    overrides = {}
    for name, variable in ENV_OVERRIDES.items():
        text = environ.get(variable)
        if text is None or not text.strip():
            continue
        value = parse_switch(text)
        if value is None:
            import logging

            logging.getLogger("comfy_accel").warning("[comfy-accel] ignoring %s=%r: expected on/off, 1/0, "
                                                     "true/false or yes/no", variable, text)
            continue
        overrides[name] = value
    return overrides


def overridden_by(name: str) -> str:
    """'VARIABLE=value' when the environment overrides setting `name` in this process, else ''."""
    if name not in _overrides:
        return ""
    return f"{ENV_OVERRIDES[name]}={os.environ.get(ENV_OVERRIDES[name], '').strip()}"


_lock = threading.Lock()
_settings = Settings()
_path: Path | None = None
_overrides: dict[str, bool] = read_env_overrides()


def load(path: Path | str | None) -> Settings:
    """Reads saved settings (a bad file is reported and ignored, never fatal) and the environment's overrides."""
    global _settings, _path, _overrides
    _path = Path(path) if path else None
    _overrides = read_env_overrides()
    if _path and _path.is_file():
        try:
            data = json.loads(_path.read_text())
            _settings = Settings(**{k: v for k, v in data.items() if k in _field_names()}).validate()
        except (ValueError, TypeError, AcceleratorInputError) as exc:
            import logging

            logging.getLogger("comfy_accel").warning("[comfy-accel] ignoring bad settings file %s: %s", _path, exc)
    return get_settings()


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings)}


def get_settings() -> Settings:
    """The settings in effect: the saved ones with the environment's overrides applied."""
    return dataclasses.replace(_settings, **_overrides) if _overrides else _settings


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
    return get_settings()


def as_dict() -> dict:
    return dataclasses.asdict(get_settings())
