"""Helpers shared by the node shims: the category, and what a node records and shows."""
from __future__ import annotations

CATEGORY = "comfy-accel"


def record_in_model(model, key: str, settings: dict) -> None:
    """Keeps what an accelerator node applied in model_options, so SaveImage metadata and the UI can show it.
    `settings["unavailable"]` (a reason) says the node attached nothing that can run here: every run is eager."""
    applied = model.model_options.setdefault("comfy_accel_applied", {})
    applied[key] = settings
    from .metadata import track_model  # the saved image's "comfy_accel" metadata reads this at sample time

    track_model(model, key)


def backend_node_result(model, key: str, settings: dict, *more_outputs) -> dict:
    """What a backend node returns: its outputs, and a UI output that ComfyUI keeps in the prompt's /history
    entry (`outputs[<node id>]["comfy_accel"]`) for API clients: what the node attached and, when that cannot
    run here, why the model runs eager. What each sampling run ran is in the record (nodes/metadata.py)."""
    record_in_model(model, key, settings)
    reason = settings.get("unavailable") or None
    shown = {"accelerator": key, "attached": "eager" if reason else settings.get("backend", key), "fallback": reason}
    if "requested" in settings:
        shown["requested"] = settings["requested"]
    if settings.get("note"):
        shown["note"] = settings["note"]
    return {"ui": {"comfy_accel": [shown]}, "result": (model, *more_outputs)}
