"""comfy-accel's host-agnostic core: one module per accelerator, the shared artifact cache, settings.

Nothing here imports ComfyUI or the WebUI at module level, so both hosts (and plain tests) can import it;
host objects are touched only inside `apply` functions.
"""
from .base import (AcceleratorInputError, AcceleratorSpec, Availability, BackendUnavailable,  # noqa: F401
                   require_sd_unet)
from .registry import all_specs, get, status  # noqa: F401
