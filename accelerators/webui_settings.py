"""The WebUI's settings section → the core settings and the artifact cache folder, each key on its own.

Host-agnostic: the WebUI shim gives it the WebUI's default cache folder (`<data dir>/models/accel_cache`) and calls
`apply` from each option's `onchange` (a bad value raises AcceleratorInputError for that key alone, which A1111
reports while putting the old value back) and `apply_saved` once at start-up with the values of config.json. The
cache folder is kept here, never put into the environment: COMFY_ACCEL_CACHE stays what the user set.
"""
from __future__ import annotations

from pathlib import Path

from . import events, settings
from .base import AcceleratorInputError
from .webui_mapping import CACHE_FOLDER_SETTING, SETTING_TO_CORE, webui_setting_to_core

SETTING_KEYS = (CACHE_FOLDER_SETTING, *SETTING_TO_CORE)   # the cache folder first: the others live beside it


class WebUISettings:
    def __init__(self, host_default: Path):
        self.host_default = Path(host_default)
        self.cache_folder: str | None = None   # the accel_cache_folder setting ("" / None: the default)
        self._store = None

    def cache_root(self) -> Path:
        from .cache import resolve_cache_root

        if self.cache_folder:
            return Path(self.cache_folder).expanduser()
        return Path(resolve_cache_root(host_default=self.host_default))

    def store(self):
        """The WebUI's ArtifactStore: the same format and key layout as ComfyUI's."""
        from .cache import ArtifactStore

        root = self.cache_root()
        budget = int(settings.get_settings().cache_budget_gb * 1e9)
        if self._store is None or Path(self._store.root) != root:
            self._store = ArtifactStore(root, budget_bytes=budget)
        self._store.budget_bytes = budget
        return self._store

    def apply(self, key: str, value) -> None:
        """One setting → the core settings (or the cache folder, whose settings.json is then read)."""
        name, checked = webui_setting_to_core(key, value)
        if name == "cache_root":
            self.cache_folder = checked
            settings.load(self.cache_root() / "settings.json")
        else:
            settings.update({name: checked})

    def apply_saved(self, saved: dict) -> dict[str, str]:
        """The saved values at start-up, each checked alone; returns (and reports) {key: why} for those not
        applied, which the host then drops (A1111 builds its settings page from them: "lots" in a number field
        stops its start-up)."""
        if CACHE_FOLDER_SETTING not in saved:
            settings.load(self.cache_root() / "settings.json")
        problems = {}
        for key in SETTING_KEYS:
            if key not in saved:
                continue
            try:
                self.apply(key, saved[key])
            except AcceleratorInputError as exc:
                problems[key] = f"setting {key} not applied (the default is used): {exc}"
        for message in problems.values():
            events.notice("webui", message, once_key=f"webui:{message}")
        return problems
