"""Nodes "Build TensorRT Engine" and "Load TensorRT Engine": MODEL → MODEL whose UNet runs in TensorRT.

Build exports the UNet, builds a refittable fp16 engine for the chosen profiles (ComfyUI progress bar,
shared timing cache) into the artifact cache, and returns the model running through it. Load takes an
engine from the cache (built here earlier, by either host) or a file from models/tensorrt built elsewhere.
LoRAs loaded after either node are applied by refit; FreeU, ControlNet and other block patches run eager
with a one-line reason. Where there is no TensorRT (or no engine to load), both follow their fallback input:
`eager` (the default, also for workflows saved before the input existed) returns the model unaccelerated and
says why, `error` fails the prompt with the reason.
"""
from __future__ import annotations

from ..accelerators import events, options
from ..accelerators.base import AcceleratorInputError, BackendUnavailable
from ..accelerators.tensorrt import NAME, apply, available
from ..accelerators.tensorrt.profiles import make_profile, preset, preset_names
from .common import CATEGORY, backend_node_result

CUSTOM = "custom (min/opt/max below)"
ENGINE_FOLDER = "tensorrt"
ENGINE_EXTENSIONS = {".engine", ".plan", ".trt"}


def _store():
    from .cache_store import comfy_store

    return comfy_store()


def _engine_files() -> list[str]:
    import folder_paths

    if ENGINE_FOLDER not in folder_paths.folder_names_and_paths:
        import os

        folder_paths.folder_names_and_paths[ENGINE_FOLDER] = (
            [os.path.join(folder_paths.models_dir, ENGINE_FOLDER)], ENGINE_EXTENSIONS)
    return folder_paths.get_filename_list(ENGINE_FOLDER)


def _cached_engines() -> dict[str, str]:
    """{label: entry id} of the engines in the artifact cache."""
    try:
        entries = _store().entries()
    except Exception:  # no cache yet (or the cache lane absent): nothing to list
        return {}
    out = {}
    for entry in entries:
        if entry.accelerator == "tensorrt":
            fields = entry.key_fields
            gpu = (fields.get("device") or {}).get("name", "?")
            family = (entry.meta or {}).get("family", "?")   # the key has no family: engines serve both hosts
            profiles = "; ".join((entry.meta or {}).get("profiles", []))[:80]
            out[f"cache:{entry.id[:12]} {family} {gpu} {profiles}"] = entry.id
    return out


def _fallback_input() -> tuple:
    return (list(options.FALLBACK_CHOICES), {"default": options.EAGER, "tooltip":
            "When TensorRT or the engine is missing here: eager runs the model unaccelerated and says why; "
            "error fails the prompt; default follows the settings."})


def _run_eager(model, node_title: str, reason: str, policy: str, node_id, settings: dict):
    """The model unaccelerated, with the reason said once (or the prompt failed under the `error` policy)."""
    if policy == "error":
        raise BackendUnavailable(f"{node_title}: {reason}")
    events.notice(NAME, f"{reason}; running eager", node_id=None if node_id is None else str(node_id))
    return model.clone(), {**settings, "fallback": policy, "unavailable": reason}


def _range(prefix: str, default: tuple, low: int, high: int, step: int) -> dict:
    return {f"{prefix}_{k}": ("INT", {"default": v, "min": low, "max": high, "step": step})
            for k, v in zip(("min", "opt", "max"), default)}


class BuildTensorRTEngine:
    DESCRIPTION = ("Builds a refittable fp16 TensorRT engine of the UNet for the chosen shapes (minutes the first "
                   "time, then cached) and returns the model running through it. LoRAs loaded after this node are "
                   "applied by refit, without a rebuild.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "profile": ([*preset_names(), CUSTOM], {"default": preset_names()[0],
                                                    "tooltip": "Shapes the engine serves. Presets hold a batch-1 "
                                                               "profile (CFG cutoff) and a batch 2-4 profile (CFG)."}),
            "static": ("BOOLEAN", {"default": False, "tooltip": "custom only: one shape (the opt values)"}),
            **_range("batch", (1, 2, 4), 1, 64, 1),
            **_range("height", (512, 512, 768), 64, 4096, 8),
            **_range("width", (512, 512, 768), 64, 4096, 8),
            **_range("tokens", (77, 77, 154), 1, 924, 1),
            "optimization_level": ("INT", {"default": 3, "min": 0, "max": 5,
                                           "tooltip": "TensorRT builder effort; 5 tunes longest"}),
        }, "optional": {"fallback": _fallback_input()}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "engine_id")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @staticmethod
    def profiles(profile, static, **ranges):
        if profile != CUSTOM:
            return preset(profile)
        triples = {dim: (ranges[f"{dim}_min"], ranges[f"{dim}_opt"], ranges[f"{dim}_max"])
                   for dim in ("batch", "height", "width", "tokens")}
        if static:
            triples = {dim: (t[1], t[1], t[1]) for dim, t in triples.items()}
        return [make_profile(**triples)]

    def build(self, model, profile, static, optimization_level=3, fallback="eager", unique_id=None, **ranges):
        import comfy.model_management
        import comfy.utils

        from ..accelerators.tensorrt.engine import BuildSettings
        from ..accelerators.tensorrt.export import unet_signature
        from ..accelerators.tensorrt.loader import TensorRTSession, build_into_store
        from ..accelerators.tensorrt import parse_options

        policy = options.parse_fallback(fallback)
        profiles = self.profiles(profile, static, **ranges)
        try:
            unet_signature(model)  # a model the export cannot take is refused before any work, with the reason
        except AcceleratorInputError as exc:
            if policy == "error":
                raise
            reason = str(exc)
        else:
            ready = available()
            reason = "" if ready else ready.reason
        if reason:
            out, settings = _run_eager(model, "Build TensorRT Engine", reason, policy, unique_id, {
                "engine": None, "profiles": [p.describe() for p in profiles]})
            return backend_node_result(out, "tensorrt", settings, "")
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        bar = comfy.utils.ProgressBar(100)
        trt_options = {"fallback": "eager", "node_id": unique_id, "get_store": _store,
                       "optimization_level": optimization_level, "profiles": [p.as_dict() for p in profiles]}
        session = TensorRTSession(parse_options(trt_options), get_store=_store)
        record = build_into_store(session, model, model.model.diffusion_model, profiles,
                                  on_progress=lambda share, _phase: bar.update_absolute(int(share * 100), 100),
                                  node_id=unique_id, settings=BuildSettings(optimization_level=optimization_level))
        bar.update_absolute(100, 100)
        out = apply(model, {**trt_options, "fallback": policy}, engines=[record])
        return backend_node_result(out, "tensorrt", {"engine": record.source, "fallback": policy,
                                                     "profiles": [p.describe() for p in profiles]}, record.source)


class LoadTensorRTEngine:
    DESCRIPTION = ("Runs the UNet through a TensorRT engine from the cache or from models/tensorrt (built "
                   "elsewhere, same input names x/timesteps/context/y). Requests outside its profiles, ControlNet "
                   "and block patches run eager with a reason.")

    @classmethod
    def INPUT_TYPES(cls):
        choices = [*_cached_engines(), *_engine_files()] or ["(no engines yet)"]
        return {"required": {
            "model": ("MODEL",),
            "engine": (choices, {"tooltip": "cache:<id> entries were built by Build TensorRT Engine"}),
            "fallback": _fallback_input(),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, engine):
        """Any engine name passes ComfyUI's validation: a workflow shared from a machine with engines names
        one this machine lacks, and what then happens is the fallback input's choice."""
        return isinstance(engine, str) or f"engine must be a name, got {engine!r}"

    def load(self, model, engine, fallback="eager", unique_id=None):
        import folder_paths

        policy = options.parse_fallback(fallback)
        cached = _cached_engines()
        if engine in cached:
            target = cached[engine]
        elif engine in _engine_files():
            target = folder_paths.get_full_path_or_raise(ENGINE_FOLDER, engine)
        else:
            reason = (f"TensorRT engine {engine!r} is neither in the cache nor in models/tensorrt (build one "
                      f"with Build TensorRT Engine, or put an engine file in models/tensorrt)")
            if policy == "error":
                raise AcceleratorInputError(reason)
            out, settings = _run_eager(model, "Load TensorRT Engine", reason, policy, unique_id, {"engine": engine})
            return backend_node_result(out, "tensorrt", settings)
        try:
            out = apply(model, {"fallback": policy, "node_id": unique_id, "get_store": _store, "engine": target,
                                "build_on_demand": False})
        except AcceleratorInputError as exc:   # a model the engine's lane cannot take
            if policy == "error":
                raise
            out, settings = _run_eager(model, "Load TensorRT Engine", str(exc), policy, unique_id, {"engine": engine})
            return backend_node_result(out, "tensorrt", settings)
        settings = {"engine": engine, "fallback": policy}
        ready = available()
        if not ready:   # the engine is here but cannot run: every call runs eager (said by the session)
            settings["unavailable"] = ready.reason
        return backend_node_result(out, "tensorrt", settings)


NODE_CLASS_MAPPINGS = {"AccelBuildTensorRTEngine": BuildTensorRTEngine, "AccelLoadTensorRTEngine": LoadTensorRTEngine}
NODE_DISPLAY_NAME_MAPPINGS = {"AccelBuildTensorRTEngine": "Build TensorRT Engine",
                              "AccelLoadTensorRTEngine": "Load TensorRT Engine"}
