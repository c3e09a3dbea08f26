"""Node "Step Cache": MODEL → MODEL that skips whole model calls on steps where the prediction barely changes."""
from __future__ import annotations

from ..accelerators import options
from ..accelerators.step_cache import StepCacheConfig, apply
from .common import CATEGORY, backend_node_result


class StepCache:
    DESCRIPTION = ("Skips whole model calls where the prediction barely changes (adaptive) or on a schedule "
                   "(interval, taylor), reusing the last full call's prediction. Any model (UNets and DiTs), any "
                   "sampler; stacks with Accelerate Model, CFG Cutoff and DeepCache. Lossy. Each run says "
                   "\"skipped N of M steps\" in the log and in a notice for this node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "cache_mode": (list(options.STEP_CACHE_MODES), {
                "default": options.STEP_CACHE_MODES[0],
                "tooltip": "adaptive: skip while the estimated change of the prediction, accumulated since the "
                           "last full step, stays under the threshold (EasyCache's rule). interval: a full step "
                           "every N. taylor: the interval schedule, extrapolating the prediction from the last "
                           "two full steps."}),
            "threshold": ("FLOAT", {**options.STEP_CACHE_THRESHOLD.widget(step=0.01),
                                    "tooltip": "adaptive: the accumulated relative change allowed before a full "
                                               "step; 0 = never skip (same result as without the node)."}),
            "interval": ("INT", {**options.STEP_CACHE_INTERVAL.widget(),
                                 "tooltip": "interval, taylor: a full step every N steps; 1 = never skip."}),
            "start": ("FLOAT", {**options.STEP_CACHE_START.widget(step=0.01),
                                "tooltip": "Skip nothing before this share of the steps."}),
            "end": ("FLOAT", {**options.STEP_CACHE_END.widget(step=0.01),
                              "tooltip": "Skip nothing from this share of the steps on."}),
            "max_consecutive": ("INT", {**options.STEP_CACHE_MAX_CONSECUTIVE.widget(),
                                        "tooltip": "At most this many skipped steps in a row."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, cache_mode, threshold, interval, start, end, max_consecutive, unique_id=None):
        config = StepCacheConfig(cache_mode=cache_mode, threshold=threshold, interval=interval, start=start,
                                 end=end, max_consecutive=max_consecutive,
                                 node_id=str(unique_id) if unique_id is not None else None)
        patched = apply(model, config)
        return backend_node_result(patched, "step_cache", {**config.settings(), "note": config.describe()})


NODE_CLASS_MAPPINGS = {"AccelStepCache": StepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"AccelStepCache": "Step Cache"}
