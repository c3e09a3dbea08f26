"""ComfyUI shims: one small file per node family, each exporting NODE_CLASS_MAPPINGS.

Every module here is imported on its own; one that fails (an optional library broken in a way the core's
checks did not catch) is logged and skipped, so the rest of the pack still loads.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path

log = logging.getLogger("comfy_accel")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
_NOT_NODE_MODULES = {"routes", "common"}

for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _info.name in _NOT_NODE_MODULES or _info.name.startswith("_"):
        continue
    try:
        _module = importlib.import_module(f"{__name__}.{_info.name}")
    except Exception:
        log.exception("[comfy-accel] node module %s failed to import", _info.name)
        continue
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
