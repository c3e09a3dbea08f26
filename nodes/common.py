"""Helpers shared by the node shims: the category, and turning core errors into node errors."""
from __future__ import annotations

CATEGORY = "comfy-accel"


def record_in_model(model, key: str, settings: dict) -> None:
    """Keeps what an accelerator node applied in model_options, so SaveImage metadata and the UI can show it."""
    applied = model.model_options.setdefault("comfy_accel_applied", {})
    applied[key] = settings
    from .metadata import track_model  # the saved image's "comfy_accel" metadata reads this at sample time

    track_model(model, key)
