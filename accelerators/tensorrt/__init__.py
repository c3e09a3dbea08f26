"""The `tensorrt` backend: the SD/SDXL UNet as a refittable TensorRT engine, with LoRA by refit.

    export.py    UNet → ONNX through the wrapper the engine is called with (x, timesteps, context[, y])
    profiles.py  presets, min/opt/max validation, tightest-covering profile selection with reasons
    refit.py     engine weight ↔ ModelPatcher key map; which weights a LoRA changes; merged values
    engine.py    TensorRT 10 build / load / run / refit (imported only when used)
    loader.py    the APPLY_MODEL wrapper, fallback reasons, memory reporting
    store.py     engines in the artifact store: one key for both hosts, build, engines already stored
    webui.py     the same engines on the AUTOMATIC1111 WebUI's ldm/sgm UNet (export, refit from its LoRA)

`available()` only looks for the library and a GPU (no import of tensorrt). `apply(model, options)` takes
the Accelerate Model node's options (see `parse_options`) and returns a clone; engines are found in the
store, or built on first use for the request's shape, then reused and refitted when LoRAs change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..base import (AcceleratorInputError, AcceleratorSpec, Availability, BackendUnavailable, cuda_available,
                    module_available, require_sd_unet)
from ..compile.session import store_getter
from ..options import parse_backend_options

if TYPE_CHECKING:   # the loader imports torch: only for the annotation
    from .loader import TensorRTOptions

NAME = "tensorrt"


def install_hint(cuda_version: str | None) -> str:
    """What installs TensorRT for this torch's CUDA: PyPI's `tensorrt-cu1x-libs` are stubs that fetch the real
    wheels from NVIDIA's index at install time (the `tensorrt` sdist likewise), so that index must be reachable."""
    major = (cuda_version or "").split(".")[0]
    package = f"tensorrt-cu{major}" if major in ("12", "13") else "tensorrt"
    return (f"pip install {package} --extra-index-url https://pypi.nvidia.com (PyPI's packages are stubs that "
            f"download TensorRT from NVIDIA at install time), or TensorRT from developer.nvidia.com/tensorrt")


def available() -> Availability:
    found = module_available("tensorrt")
    if not found:
        import torch

        return Availability(False, f"tensorrt not installed: {install_hint(torch.version.cuda)}")
    gpu = cuda_available()
    if not gpu:
        return Availability(False, "needs a CUDA GPU (none visible to torch)")
    return Availability(True, f"TensorRT on {gpu.reason}")


def parse_options(options) -> "TensorRTOptions":
    """Validates the Accelerate Model options (plus `preset`, `profiles`, `engine`, `build_on_demand`,
    `optimization_level`); raises AcceleratorInputError naming the bad value."""
    from .loader import TensorRTOptions
    from .profiles import preset as preset_profiles
    from .profiles import validate_profiles

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise AcceleratorInputError(f"tensorrt options must be a dict, got {type(options).__name__}")
    mode, dynamic, fallback = parse_backend_options(options)
    node_id = options.get("node_id")
    level = options.get("optimization_level", 5 if mode == "max-autotune" else 3)
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5:
        raise AcceleratorInputError(f"optimization_level must be a whole number 0..5; got {level!r}")
    preset = options.get("preset")
    if preset in ("", "auto"):
        preset = None
    if preset is not None:
        preset_profiles(preset)  # raises for an unknown name
    profiles = options.get("profiles")
    if profiles is not None:
        profiles = validate_profiles(profiles)
    build = options.get("build_on_demand", True)
    if not isinstance(build, bool):
        raise AcceleratorInputError(f"build_on_demand must be true or false; got {build!r}")
    return TensorRTOptions(fallback=fallback, node_id=None if node_id is None else str(node_id), profiles=profiles,
                           preset=preset, dynamic=dynamic, build_on_demand=build, optimization_level=level)


def apply(model, options: dict | None = None, engines=None):
    """A clone of the ModelPatcher whose UNet runs through TensorRT engines (eager with a reason otherwise).

    `engines`: EngineRecords to use (the nodes pass the one they built or loaded); `options["engine"]` may
    name a cache entry id or an engine file instead.
    """
    from .export import unet_signature
    from .loader import TensorRTSession, attach, build_into_store, cached_records, record_from_entry, record_from_file

    options = dict(options or {})
    parsed = parse_options(options)
    require_sd_unet(model, "TensorRT")
    unet_signature(model)  # a UNet the export cannot take fails here, with the reason
    ready = available()
    if not ready and parsed.fallback == "error":
        raise BackendUnavailable(f"tensorrt: {ready.reason}")
    get_store = store_getter(options)
    records = list(engines or [])
    named = options.get("engine")
    if named:
        if not isinstance(named, str):
            raise AcceleratorInputError(f"engine must be a cache entry id or a file path; got {named!r}")
        store = get_store() if get_store else None
        if store is not None and len(named) == 64 and all(c in "0123456789abcdef" for c in named):
            records.append(record_from_entry(store.entry(named)))
        else:
            records.append(record_from_file(named))
    session = TensorRTSession(parsed, get_store=get_store, engines=records, builder=build_into_store)
    if not records and ready and get_store is not None:
        session.records.extend(cached_records(get_store(), model))
    return attach(model, session)


@dataclass
class TensorRTConfig:
    preset: str = "auto"            # profile preset for engines built on first use ("auto": from the request)
    build_on_demand: bool = True    # build an engine when none covers the request (minutes, then cached)
    optimization_level: int = 3     # TensorRT builder optimization level 0..5
    fallback: str = "eager"


ACCELERATOR_SPECS = [AcceleratorSpec(
    name=NAME, title="TensorRT",
    description="Runs the SD/SDXL UNet as a TensorRT engine (fp16, dynamic profiles); LoRA by refit, no rebuild.",
    config=TensorRTConfig, available=available, apply=apply, kind="backend", lossless=True, order=30)]

__all__ = ["available", "apply", "parse_options", "ACCELERATOR_SPECS", "NAME", "TensorRTConfig"]
