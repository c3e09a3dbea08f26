"""Where the shared artifact cache lives inside ComfyUI: models/accel_cache, registered with folder_paths.

COMFY_ACCEL_CACHE overrides it (so ComfyUI and the WebUI can share one store). Settings are kept beside
the store, so the budget chosen in the browser applies after a restart too.
"""
from __future__ import annotations

from pathlib import Path

FOLDER_KEY = "accel_cache"


def host_default_root() -> Path:
    import folder_paths

    return Path(folder_paths.models_dir) / FOLDER_KEY


def cache_root() -> Path:
    from ..accelerators.cache import resolve_cache_root

    return Path(resolve_cache_root(host_default=host_default_root()))


def configure() -> Path:
    """Registers the folder with folder_paths and loads the saved settings; returns the cache root."""
    import folder_paths

    from ..accelerators import settings

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path(FOLDER_KEY, str(root), is_default=True)
    settings.load(root / "settings.json")
    return root


def comfy_store():
    """The process's one ArtifactStore (`cache.default_store`) for ComfyUI's folder, budget from the settings."""
    from ..accelerators import settings
    from ..accelerators.cache import default_store

    return default_store(cache_root(), budget_bytes=settings.get_settings().cache_budget_gb * 1e9)
