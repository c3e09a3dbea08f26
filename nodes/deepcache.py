"""Node "DeepCache": MODEL → MODEL that runs the full UNet every N steps and only its shallow blocks between."""
from __future__ import annotations

from ..accelerators import options
from ..accelerators.deepcache import DeepCacheConfig, apply
from .common import CATEGORY, record_in_model


class DeepCache:
    DESCRIPTION = ("Reuses the UNet's deep features between steps: a full UNet step every `cache_interval` "
                   "steps, only the shallow blocks in between (lossy; speed-ups in the pack's docs/benchmarks.md). "
                   "SD1.x/SD2.x/SDXL. Steps with a ControlNet attached run in full.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "cache_interval": ("INT", {**options.DEEPCACHE_INTERVAL.widget(),
                                       "tooltip": "A full UNet step every N steps; 1 = off (same result as "
                                                  "without the node)."}),
            "cache_branch": ("INT", {**options.DEEPCACHE_BRANCH.widget(),
                                     "tooltip": "Which skip branch the cached steps keep: 0 runs only the "
                                                "outermost blocks (fastest), higher values run more blocks "
                                                "(closer to the full model). SD1.5 has 12 branches, SDXL 9."}),
            "start_percent": ("FLOAT", {**options.PERCENT.widget(),
                                        "tooltip": "Cache from this % of the steps on (full steps before)."}),
            "end_percent": ("FLOAT", {**options.PERCENT.widget(), "default": options.PERCENT.high,
                                      "tooltip": "Cache up to this % of the steps (full steps after)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, cache_interval, cache_branch, start_percent, end_percent, unique_id=None):
        config = DeepCacheConfig(cache_interval=cache_interval, cache_branch=cache_branch,
                                 start_percent=start_percent, end_percent=end_percent,
                                 node_id=str(unique_id) if unique_id is not None else None)
        patched = apply(model, config)
        record_in_model(patched, "deepcache", config.settings())
        return (patched,)


NODE_CLASS_MAPPINGS = {"AccelDeepCache": DeepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"AccelDeepCache": "DeepCache"}
