"""Node "CFG Cutoff": MODEL → MODEL that stops the unconditional pass after a share of the steps."""
from __future__ import annotations

from ..accelerators import options
from ..accelerators.cfg_cutoff import CFGCutoffConfig, apply
from .common import CATEGORY, record_in_model


class CFGCutoff:
    DESCRIPTION = ("Stops computing the negative (unconditional) prompt after a share of the steps: "
                   "the model then runs at batch 1 instead of 2. Lossy but usually invisible past ~60%.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "cutoff_percent": ("FLOAT", {**options.CFG_CUTOFF_PERCENT.widget(),
                                         "tooltip": "Skip the uncond pass from this % of the steps on. "
                                                    "100 = never (plain CFG), 0 = from the first step (cfg 1)."}),
        }, "optional": {
            "sigma_threshold": ("FLOAT", {**options.SIGMA_THRESHOLD.widget(step=0.01),
                                          "tooltip": "If > 0, skip the uncond pass once sigma <= this value "
                                                     "instead of using the percent."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, cutoff_percent, sigma_threshold=options.SIGMA_THRESHOLD.default):
        config = CFGCutoffConfig(cutoff_percent=cutoff_percent, sigma_threshold=sigma_threshold)
        patched = apply(model, config)
        record_in_model(patched, "cfg_cutoff", {"cutoff_percent": cutoff_percent, "sigma_threshold": sigma_threshold})
        return (patched,)


NODE_CLASS_MAPPINGS = {"AccelCFGCutoff": CFGCutoff}
NODE_DISPLAY_NAME_MAPPINGS = {"AccelCFGCutoff": "CFG Cutoff"}
