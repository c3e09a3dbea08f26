"""The refit map: which engine weight is which ComfyUI UNet weight, and which of them a LoRA changes.

The exporter (export.py) names every ONNX initializer after the UNet state-dict key it came from and folds
the layout ops it put on a parameter (the transpose of a Linear weight before MatMul, the unsqueeze of a
GroupNorm scale) into the initializer, recording them here. So the map is exact by construction — no
matching of values, which breaks on equal tensors such as zero biases — and serialisable (JSON), so it is
stored beside the engine and no ONNX needs to stay on disk.

For refit the live weights come from the ModelPatcher's public patch API: `get_key_patches()` gives, per
key, the base weight (from ComfyUI's backup when the model is currently patched in place) and the patch
list; `comfy.lora.calculate_weight` merges them exactly as ComfyUI does at load. `RefitState` remembers
which engine weights currently hold non-base values, so removing a LoRA restores exactly those.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

PREFIX = "diffusion_model."   # ModelPatcher keys of the UNet; the export wrapper's attribute has this name


@dataclass(frozen=True)
class RefitEntry:
    key: str                          # ModelPatcher key, e.g. "diffusion_model.input_blocks.1.1.proj_in.weight"
    transform: tuple = ()             # (("transpose", (1, 0)), ("unsqueeze", (1, 2)), ...) applied in order
    shape: tuple = ()                 # shape of the initializer (after the transform)

    def as_dict(self) -> dict:
        return {"key": self.key, "transform": [[op, list(arg)] for op, arg in self.transform], "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "RefitEntry":
        return cls(key=data["key"], transform=tuple((op, tuple(arg)) for op, arg in data.get("transform", ())),
                   shape=tuple(data.get("shape", ())))


@dataclass
class RefitMap:
    """ONNX initializer (= engine weight) name → RefitEntry. Names not here are constants of the graph."""
    entries: dict[str, RefitEntry] = field(default_factory=dict)

    def names_for_keys(self, keys: Iterable[str]) -> set[str]:
        wanted = set(keys)
        return {name for name, entry in self.entries.items() if entry.key in wanted}

    def keys(self) -> set[str]:
        return {entry.key for entry in self.entries.values()}

    def to_json(self) -> str:
        return json.dumps({"schema": 1, "entries": {n: e.as_dict() for n, e in sorted(self.entries.items())}})

    @classmethod
    def from_json(cls, text: str | bytes) -> "RefitMap":
        data = json.loads(text)
        return cls({name: RefitEntry.from_dict(e) for name, e in data.get("entries", {}).items()})

    def __len__(self) -> int:
        return len(self.entries)


def apply_transform(tensor, transform: Iterable) -> "object":
    """The UNet weight laid out as the engine holds it (works for torch tensors and numpy arrays)."""
    for op, arg in transform:
        if op == "transpose":
            tensor = tensor.permute(*arg) if hasattr(tensor, "permute") else tensor.transpose(arg)
        elif op == "unsqueeze":
            for axis in sorted(arg):
                tensor = tensor.unsqueeze(axis) if hasattr(tensor, "unsqueeze") else _np_expand(tensor, axis)
        else:
            raise ValueError(f"unknown refit transform {op!r}")
    return tensor


def _np_expand(array, axis):
    import numpy as np

    return np.expand_dims(array, axis)


# ---- what a patched model changes ------------------------------------------------------------------------
def unsupported_weight_changes(patcher) -> str:
    """Why the live weights cannot be expressed as a refit ('' when they can)."""
    if getattr(patcher, "weight_wrapper_patches", None):
        return "the model has weight wrappers (evaluated per call), which a TensorRT engine cannot apply"
    if getattr(patcher, "hook_patches", None):
        return "the model has scheduled LoRA hooks (weights change during sampling)"
    touched = [k for k in getattr(patcher, "object_patches", {}) if k == "diffusion_model" or k.startswith(PREFIX)]
    if touched:
        return f"an object patch replaces {touched[0]}, which the engine does not contain"
    return ""


def patched_keys(patcher) -> set[str]:
    """UNet keys whose weights the patcher's patches (LoRA, model merges, ...) change."""
    return {key for key, patches in getattr(patcher, "patches", {}).items() if key.startswith(PREFIX) and patches}


def refit_names(refit_map: RefitMap, patcher) -> set[str]:
    """Exactly the engine weights a patched model changes (a LoRA's keys, in engine names)."""
    return refit_map.names_for_keys(patched_keys(patcher))


def patch_signature(patches) -> tuple:
    """Identity of one key's patch list within this process (the patch objects are held by the patcher)."""
    return tuple((float(p[0]), id(p[1]), float(p[2]), repr(p[3]), id(p[4])) for p in patches)


def desired_state(refit_map: RefitMap, patcher) -> dict[str, tuple]:
    """{engine weight name: signature of its patches} for every engine weight the patcher changes."""
    signatures = {}
    patches = getattr(patcher, "patches", {})
    for name in refit_names(refit_map, patcher):
        signatures[name] = patch_signature(patches[refit_map.entries[name].key])
    return signatures


def live_weights(patcher, names: Iterable[str], refit_map: RefitMap, dtype=None, device=None) -> dict:
    """{engine weight name: tensor} of the patcher's merged weights (base + patches), laid out for the engine.

    Names whose key has no patch get the base weight (this is how a removed LoRA is undone). Merging runs
    in float32 like ComfyUI's own `patch_weight_to_device`, then casts to `dtype` (the engine's).
    """
    import torch

    import comfy.lora

    names = list(names)
    keys = {refit_map.entries[n].key for n in names}
    key_patches = patcher.get_key_patches(PREFIX)
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in key_patches:
            raise KeyError(f"refit map names {key}, which this model does not have (another architecture?)")
        (base, convert), *patches = key_patches[key]
        target_dtype = dtype or base.dtype
        where = device if device is not None else base.device
        if not patches:
            merged[key] = base.detach().to(where, target_dtype)
            continue
        weight = base.detach().to(where, torch.float32, copy=True)
        if convert is not None:
            weight = convert(weight, inplace=True)
        weight = comfy.lora.calculate_weight(patches, weight, key)
        merged[key] = weight.to(target_dtype)
    out = {}
    for name in names:
        entry = refit_map.entries[name]
        out[name] = apply_transform(merged[entry.key], entry.transform).contiguous()
    return out


def base_weights(patcher, keys: Iterable[str]) -> dict:
    """{key: base weight} without any patch (for writing the base model into a fresh export)."""
    key_patches = patcher.get_key_patches(PREFIX)
    return {key: key_patches[key][0][0] for key in keys if key in key_patches}


class RefitState:
    """What the engine's weights are now: base everywhere except `current` ({name: patch signature})."""

    def __init__(self):
        self.current: dict[str, tuple] = {}

    def plan(self, desired: Mapping[str, tuple]) -> tuple[set[str], set[str]]:
        """(names to set to patched values, names to restore to base)."""
        changed = {n for n, sig in desired.items() if self.current.get(n) != sig}
        restore = set(self.current) - set(desired)
        return changed, restore

    def commit(self, desired: Mapping[str, tuple]) -> None:
        self.current = dict(desired)

    def reset(self) -> None:
        self.current = {}
