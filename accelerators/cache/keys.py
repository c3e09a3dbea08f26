"""Artifact keys: every field that makes a compiled artifact valid, hashed into one fixed-length id.

A key keeps its fields readable (they go into the entry's manifest) so that a miss can be explained field by
field: `describe_differences` turns two field dicts into lines such as "torch 2.11 → 2.12" or
"profile height 512..512 does not cover 768".
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from .environment import current_device, describe_device, runtime_versions
from .errors import InvalidArtifactId

KEY_SCHEMA = 1
ID_LENGTH = 64
_ID_RE = re.compile(r"[0-9a-f]{64}")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
                  "fp64": "float64", "double": "float64", "fp8": "float8_e4m3fn"}


def validate_id(artifact_id: Any) -> str:
    """Returns the id if it is exactly 64 lowercase hex digits; anything else (paths included) raises."""
    if not isinstance(artifact_id, str) or not _ID_RE.fullmatch(artifact_id):
        shown = repr(artifact_id)[:80]
        raise InvalidArtifactId(f"invalid artifact id {shown}: expected {ID_LENGTH} lowercase hex digits")
    return artifact_id


def is_valid_id(artifact_id: Any) -> bool:
    return isinstance(artifact_id, str) and _ID_RE.fullmatch(artifact_id) is not None


def plain(value: Any, where: str = "key") -> Any:
    """`value` as JSON types only; refuses objects whose text would not be stable between processes."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"cache key field {where} is {value}; use a finite number")
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value, where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key field {where} has a non-string key {k!r}")
            out[k] = plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return value.as_posix()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), where)
    kind = type(value)
    if kind.__module__ == "torch" and kind.__name__ in ("dtype", "device", "Size"):
        return list(value) if kind.__name__ == "Size" else str(value).removeprefix("torch.")
    if kind.__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars
        return plain(value.item(), where)
    raise TypeError(f"cache key field {where} has a {kind.__name__} value; use JSON types (str, number, list, dict)")


def canonical_json(value: Any) -> str:
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def normalize_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.").strip().lower()
    return _DTYPE_ALIASES.get(name, name)


def normalize_profile(profile: Mapping | None) -> dict:
    """{dim: [min, max]} with ints; a plain int means [n, n]."""
    out = {}
    for dim, span in (profile or {}).items():
        if isinstance(span, bool):
            raise TypeError(f"profile {dim} must be an int or [min, max]; got {span!r}")
        low, high = (span, span) if isinstance(span, int) else tuple(span)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not 0 <= low <= high:
            raise ValueError(f"profile {dim} must be 0 <= min <= max ints; got {span!r}")
        out[str(dim)] = [low, high]
    return out


def _span_text(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}..{high}"


def profile_covers(profile: Mapping, request: Mapping) -> tuple[bool, str]:
    """Whether a profile ({dim: [min, max]}) serves a request ({dim: int} or {dim: [min, max]}).

    A dim the profile does not name is unconstrained. Returns (True, "") or (False, the reason).
    """
    misses = []
    for dim, wanted in request.items():
        if dim not in profile:
            continue
        low, high = profile[dim] if not isinstance(profile[dim], int) else (profile[dim], profile[dim])
        want_low, want_high = (wanted, wanted) if isinstance(wanted, int) else tuple(wanted)
        if not (low <= want_low and want_high <= high):
            misses.append(f"profile {dim} {low}..{high} does not cover {_span_text(want_low, want_high)}")
    return (not misses, "; ".join(misses))


def profile_width(profile: Mapping) -> int:
    """How loose a profile is (sum of span widths): the tightest covering profile is usually the fastest."""
    return sum(high - low for low, high in profile.values())


@dataclasses.dataclass(frozen=True, eq=False)
class ArtifactKey:
    """The identity of one artifact: readable `fields` and `id`, the sha256 of their canonical JSON."""

    fields: dict
    id: str

    @classmethod
    def build(cls, accelerator: str, options: Mapping | None = None, model_config: Mapping | None = None,
              weights: str = "", profile: Mapping | None = None, dtype: Any = None, device: Any = None,
              versions: Mapping | None = None, extra_versions: Mapping | None = None) -> "ArtifactKey":
        """device/versions None → this process's (`environment_fields`); extra_versions adds backend libraries."""
        if not isinstance(accelerator, str) or not accelerator.strip():
            raise ValueError(f"accelerator must be a non-empty name; got {accelerator!r}")
        if not isinstance(weights, str):
            raise TypeError(f"weights must be a fingerprint string from weights_fingerprint(model); "
                            f"got {type(weights).__name__}")
        if device is None:
            device = current_device()
        elif not isinstance(device, Mapping):
            device = describe_device(device)
        if versions is None:
            versions = runtime_versions()
        fields = {
            "schema": KEY_SCHEMA,
            "accelerator": accelerator.strip(),
            "options": plain(dict(options or {}), "options"),
            "model_config": plain(dict(model_config or {}), "model_config"),
            "weights": str(weights or ""),
            "profile": normalize_profile(profile),
            "dtype": normalize_dtype(dtype),
            "device": plain(dict(device), "device"),
            "versions": plain({**dict(versions), **dict(extra_versions or {})}, "versions"),
        }
        return cls.from_fields(fields)

    @classmethod
    def from_fields(cls, fields: Mapping) -> "ArtifactKey":
        fields = plain(dict(fields), "key")
        return cls(fields=fields, id=_sha256(fields))

    @property
    def base_id(self) -> str:
        """The id without the profile: artifacts that differ only in shapes share it."""
        return base_id_of(self.fields)

    @property
    def accelerator(self) -> str:
        return self.fields["accelerator"]

    def __eq__(self, other) -> bool:
        return isinstance(other, ArtifactKey) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def describe(self) -> str:
        profile = ", ".join(f"{d} {_span_text(*s)}" for d, s in self.fields.get("profile", {}).items())
        return f"{self.accelerator} · {self.fields.get('dtype')} · {profile or 'any shape'} · {self.id[:12]}"


def base_id_of(fields: Mapping) -> str:
    return _sha256({k: v for k, v in fields.items() if k != "profile"})


def _flatten(value: Any, prefix: str) -> dict:
    if isinstance(value, Mapping) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _text(value: Any) -> str:
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _device_text(device: Mapping) -> str:
    if not device:
        return "none"
    name = device.get("name") or device.get("type", "?")
    capability = device.get("capability")
    return f"{name} ({capability})" if capability else str(name)


def describe_differences(cached: Mapping, wanted: Mapping, limit: int = 4) -> list[str]:
    """Lines that say why an artifact built for `cached` fields does not serve `wanted` ("old → new")."""
    lines: list[str] = []

    def nested(label: str, group: str) -> None:
        old, new = _flatten(cached.get(group) or {}, ""), _flatten(wanted.get(group) or {}, "")
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        for name in changed[:limit]:
            lines.append(f"{label}{name} {_text(old.get(name))} → {_text(new.get(name))}")
        if len(changed) > limit:
            lines.append(f"{label.strip() or group}: {len(changed) - limit} more differences")

    if cached.get("schema") != wanted.get("schema"):
        lines.append(f"cache key format {cached.get('schema')} → {wanted.get('schema')}")
    if cached.get("accelerator") != wanted.get("accelerator"):
        lines.append(f"accelerator {cached.get('accelerator')} → {wanted.get('accelerator')}")
    if cached.get("weights") != wanted.get("weights"):
        old_weights, new_weights = _text(cached.get("weights"))[:15], _text(wanted.get("weights"))[:15]
        lines.append(f"base weights differ ({old_weights} → {new_weights})")
    nested("model_config ", "model_config")
    nested("option ", "options")
    if cached.get("dtype") != wanted.get("dtype"):
        lines.append(f"dtype {_text(cached.get('dtype'))} → {_text(wanted.get('dtype'))}")
    if (cached.get("device") or {}) != (wanted.get("device") or {}):
        old_device, new_device = _device_text(cached.get("device") or {}), _device_text(wanted.get("device") or {})
        lines.append(f"device {old_device} → {new_device}")
    nested("", "versions")
    old_profile, new_profile = cached.get("profile") or {}, wanted.get("profile") or {}
    if old_profile != new_profile:
        covered, reason = profile_covers(old_profile, new_profile)
        if not covered:
            lines.extend(reason.split("; "))
        else:  # an exact-key lookup missed, but get_covering would serve it
            lines.append("profile differs: " + ", ".join(f"{d} {_span_text(*s)}" for d, s in old_profile.items())
                         + " covers the request")
    return lines
