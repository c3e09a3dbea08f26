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

from .base import AcceleratorInputError

FALLBACK_POLICIES = ("eager", "error")
BACKENDS = ("auto", "inductor", "inductor+cudagraphs", "onediff", "stable-fast", "tensorrt", "eager")


SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                "off": False}


@dataclass
class Settings:
    default_backend: str = "auto"
    fallback_policy: str = "eager"        # eager: run unaccelerated and say why; error: fail the prompt
    cache_budget_gb: float = 20.0         # disk budget of the artifact cache
    memory_budget_gb: float = 8.0         # live compiled objects/engines kept in memory
    # inductor+cudagraphs precompiles the whole UNet (compile/precompile.py), so that a new process loads it
    # without tracing; off: the compile-cache artifacts only
    precompile: bool = True
    channels_last: bool = True            # convolution weights kept channels-last on a GPU (compile/graphs.py)
    preimport: bool = True                # the compiler's modules imported at startup (compile/preimport.py)

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
        for name in ENV_OVERRIDES:
            if not isinstance(getattr(self, name), bool):
                raise AcceleratorInputError(f"{name} must be true or false; got {getattr(self, name)!r}")
        return self


# on/off settings an environment variable overrides for one process
ENV_OVERRIDES = {"precompile": "COMFY_ACCEL_PRECOMPILE", "channels_last": "COMFY_ACCEL_CHANNELS_LAST",
                 "preimport": "COMFY_ACCEL_PREIMPORT"}


def parse_switch(text: str) -> bool | None:
    """An on/off word (1/0, true/false, yes/no, on/off, any case) as a bool; None for anything else."""
    return SWITCH_WORDS.get(str(text).strip().lower())


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


def settings_path() -> Path | None:
    return _path


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
