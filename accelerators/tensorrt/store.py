"""TensorRT engines in the artifact store: the key, building one into the store, finding those already there.

One key for both hosts. An engine is a function of the UNet's architecture and base weights, the build settings,
the profiles, the TensorRT version and the GPU; not of the host that exported it: both faces export with the same
input names (x, timesteps, context[, y]), the same output, and initializers named by the checkpoint's UNet keys
(`diffusion_model.*`), so an engine and its refit map built by ComfyUI serve the WebUI's UNet and the other way
round. The key therefore leaves out the host, torch and Python versions (which the compile lane's keys carry, since
compiled graphs are host code) and the family label each host names differently; the sampled weights fingerprint
already pins every tensor name, shape and dtype.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from .. import events
from ..base import AcceleratorInputError, BackendUnavailable, model_family
from . import refit as refit_mod
from .profiles import envelope

log = logging.getLogger("comfy_accel")
ACCELERATOR = "tensorrt"
ENGINE_FILE = "unet.plan"
REFIT_FILE = "refit_map.json"
PROFILES_FILE = "profiles.json"


def base_state(patcher) -> dict:
    """{key: base tensor} of a ComfyUI UNet without patches (the cache key's weights)."""
    return {k: v[0][0] for k, v in patcher.get_key_patches(refit_mod.PREFIX).items()}


def engine_versions(tensorrt_version: str | None = None) -> dict:
    """What an engine depends on besides GPU and model: the TensorRT that built it and this pack (the export and
    the refit map's format). No host, torch or Python: an engine is shared between hosts."""
    from ..cache.environment import pack_version
    from .engine import trt_version

    return {"comfy_accel": pack_version(), "tensorrt": tensorrt_version or trt_version()}


def engine_key(signature, weights: str, profiles, settings, dtype: str, tensorrt_version: str | None = None,
               device=None):
    """The artifact key of an engine: TensorRT version, GPU (name + compute capability via the store's device
    fields), profiles, build settings, UNet architecture and base-weights fingerprint; the same on both hosts."""
    from ..cache import ArtifactKey

    profile = dict(envelope(profiles))
    for i, p in enumerate(profiles):   # exact profiles (and opts) in the id; coverage uses the envelope
        for dim, (low, opt, high) in p.as_dict().items():
            profile[f"p{i}_{dim}"] = [low, high]
            profile[f"p{i}_{dim}_opt"] = [opt, opt]
    return ArtifactKey.build(accelerator=ACCELERATOR, options={"build": settings.as_key()},
                             model_config=signature.key_fields(), weights=weights, profile=profile, dtype=dtype,
                             device=device, versions=engine_versions(tensorrt_version))


def comfy_engine_key(patcher, profiles, settings, tensorrt_version: str | None = None, device=None, unet=None):
    """The key of an engine for a ComfyUI ModelPatcher's UNet (its base weights, without LoRA patches)."""
    from ..cache import weights_fingerprint
    from .export import signature_of_unet

    unet = unet if unet is not None else patcher.model.diffusion_model
    dtype = "float16" if settings.fp16 else str(next(unet.parameters()).dtype).removeprefix("torch.")
    return engine_key(signature_of_unet(unet, model_family(patcher)), weights_fingerprint(base_state(patcher)),
                      profiles, settings, dtype, tensorrt_version=tensorrt_version, device=device)


def record_from_entry(entry):
    from .loader import EngineRecord
    from .profiles import profile_from_dict

    profiles = [profile_from_dict(p) for p in json.loads(entry.read_bytes(PROFILES_FILE))]
    refit_map = refit_mod.RefitMap.from_json(entry.read_bytes(REFIT_FILE)) if REFIT_FILE in entry.files else None
    return EngineRecord(source=entry.id[:12], profiles=profiles, refit_map=refit_map,
                        load_plan=lambda: entry.read_bytes(ENGINE_FILE))


def record_from_file(path: str | Path):
    """An engine built elsewhere (a .engine/.plan/.trt file). A `<file>.refit_map.json` beside it enables refit."""
    from .loader import EngineRecord

    path = Path(path)
    if not path.is_file():
        raise AcceleratorInputError(f"TensorRT engine file {path} does not exist")
    side = path.with_name(path.name + ".refit_map.json")
    refit_map = refit_mod.RefitMap.from_json(side.read_text()) if side.is_file() else None
    return EngineRecord(source=path.name, profiles=[], refit_map=refit_map, load_plan=path.read_bytes)


def build_record(store, key, export: Callable, signature, profiles, settings, node_id=None, on_progress=None):
    """Exports (`export(folder)` → export.ExportResult), builds a refittable engine and stores it (engine + refit
    map + profiles, no ONNX): the host-agnostic part of a build. Reuses an engine already in the store under `key`.
    Raises BackendUnavailable with the reason."""
    from .engine import build_engine

    def build(folder: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix="comfy-accel-onnx-") as onnx_dir:
            exported = export(onnx_dir)
            plan, new_cache = build_engine(
                exported.path, exported.input_names, profiles,
                lambda p: p.tensor_shapes(signature.context_dim, signature.adm_channels, signature.in_channels),
                settings, timing_cache=_timing_cache(store), node_id=node_id, on_progress=on_progress)
        (folder / ENGINE_FILE).write_bytes(plan)
        (folder / REFIT_FILE).write_text(exported.refit_map.to_json())
        (folder / PROFILES_FILE).write_text(json.dumps([p.as_dict() for p in profiles]))
        _save_timing_cache(store, new_cache)
        # the family label as the building host names it: for lists, not part of the (shared) key
        return {"profiles": [p.describe() for p in profiles], "refit_weights": len(exported.refit_map),
                "family": signature.family}

    try:
        if store is None:
            from .loader import EngineRecord

            with tempfile.TemporaryDirectory(prefix="comfy-accel-trt-") as scratch:
                build(Path(scratch))
                plan = (Path(scratch) / ENGINE_FILE).read_bytes()
                refit_map = refit_mod.RefitMap.from_json((Path(scratch) / REFIT_FILE).read_text())
            events.notice(ACCELERATOR, "no artifact store given: the engine lives in memory only", level="info",
                          node_id=node_id)
            return EngineRecord(source="memory", profiles=list(profiles), refit_map=refit_map, load_plan=lambda: plan)
        result = store.get_or_build(key, build)
    except BackendUnavailable:
        raise
    except Exception as exc:  # export/build errors become a reason to run eager
        raise BackendUnavailable(f"TensorRT engine build failed: {type(exc).__name__}: {exc}") from exc
    if result.entry is None:
        raise BackendUnavailable(result.reason)
    return record_from_entry(result.entry)


def build_into_store(session, patcher, unet, profiles, on_progress=None, node_id=None, settings=None):
    """ComfyUI: exports the ModelPatcher's UNet (base weights where a LoRA is patched in place) and builds."""
    from .engine import BuildSettings
    from .export import export_onnx, signature_of_unet

    settings = settings or BuildSettings(optimization_level=session.options.optimization_level)
    signature = signature_of_unet(unet, model_family(patcher))
    base = base_state(patcher)
    key = comfy_engine_key(patcher, profiles, settings, unet=unet)

    def export(onnx_dir):
        in_place = set(getattr(patcher, "backup", {})) | set(getattr(patcher, "hook_backup", {}))
        return export_onnx(unet, onnx_dir, profiles[0], family=signature.family,
                           base_weights={k: base[k] for k in in_place if k in base})

    store = session.get_store() if session.get_store else None
    return build_record(store, key, export, signature, profiles, settings, node_id=node_id, on_progress=on_progress)


def _timing_cache_key():
    from ..cache import ArtifactKey

    return ArtifactKey.build(accelerator="tensorrt-timing-cache", versions=engine_versions())


def _timing_cache(store) -> bytes | None:
    if store is None:
        return None
    entry = store.get(_timing_cache_key())
    return entry.read_bytes("timing.cache") if entry is not None else None


def _save_timing_cache(store, data: bytes) -> None:
    if store is not None and data:
        try:
            store.put(_timing_cache_key(), {"timing.cache": data})
        except Exception as exc:  # the cache is an optimisation: never fail a build over it
            log.warning("[comfy-accel] tensorrt: could not save the timing cache: %s", exc)


def records_for(store, model_config: dict, fingerprint: str) -> list:
    """Engines already in the store for this architecture and base weights, this TensorRT and this GPU (built by
    either host)."""
    if store is None:
        return []
    from ..cache import environment_fields
    from .engine import trt_version

    device, version = environment_fields()["device"], trt_version()
    records = []
    for entry in store.entries():
        fields = entry.key_fields
        if (fields.get("accelerator") != ACCELERATOR or fields.get("weights") != fingerprint
                or fields.get("model_config") != model_config or fields.get("device") != device
                or (fields.get("versions") or {}).get("tensorrt") != version):
            continue
        try:
            records.append(record_from_entry(entry))
        except Exception as exc:
            log.warning("[comfy-accel] tensorrt: skipping unreadable engine %s: %s", entry.id[:12], exc)
    return records


def cached_records(store, patcher) -> list:
    """ComfyUI: the engines in the store for this ModelPatcher's base weights."""
    if store is None:
        return []
    from ..cache import weights_fingerprint
    from .export import unet_signature

    return records_for(store, unet_signature(patcher).key_fields(), weights_fingerprint(base_state(patcher)))
