"""Node "Accelerate Model": MODEL → MODEL whose UNet runs through the chosen compile backend or engine."""
from __future__ import annotations

from ..accelerators import options
from ..accelerators.accelerate import accelerate
from .cache_store import comfy_store
from .common import CATEGORY, backend_node_result


class AccelerateModel:
    DESCRIPTION = ("Runs the diffusion model compiled: torch.compile (inductor), the same replayed as CUDA graphs, "
                   "OneDiff, Stable Fast or TensorRT. SD UNets are compiled whole; DiTs (Flux, SD3, Qwen-Image, "
                   "Wan, HunyuanVideo, LTXV, ...) by torch.compile block by block, each transformer block class "
                   "once. The first run of each shape compiles (progress in a toast), later "
                   "runs and restarts reuse the artifact cache. LoRA, FreeU, CFG Cutoff and DeepCache keep "
                   "working around it; a backend missing here runs eager and says why.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "backend": (list(options.BACKEND_CHOICES), {"default": options.AUTO, "tooltip":
                        "auto: the fastest backend here (eager on a CPU; the notice says which and why); "
                        "default: the one chosen in the settings (Accel → Default backend); eager: none (for "
                        "A/B comparisons)."}),
        }, "optional": {
            "mode": (list(options.MODES), {"default": options.MODES[0], "tooltip":
                     "max-autotune tunes GEMMs and convolutions: minutes more to compile, a little faster."}),
            "dynamic": (list(options.DYNAMIC), {"default": options.DYNAMIC[0], "tooltip":
                        "buckets: one compiled graph per resolution/batch/prompt length (up to 8); static: the "
                        "first shape only, others eager; dynamic: one shape-generic graph."}),
            "fallback": (list(options.FALLBACK_CHOICES), {"default": options.DEFAULT, "tooltip":
                         "When the backend cannot serve a run: eager runs unaccelerated and says why; error "
                         "fails the prompt; default follows the settings."}),
            "keep_weights_on_gpu": ("BOOLEAN", {"default": False, "tooltip":
                                    "Keep this model's weights on the GPU between runs, like ComfyUI's "
                                    "--highvram for this model only: a LoRA change then costs no reload of the "
                                    "whole UNet, but ComfyUI can no longer free "
                                    "this model's VRAM for other models."}),
            "scope": (list(options.SCOPES), {"default": options.SCOPES[0], "tooltip":
                      "What one compile covers (torch.compile backends). auto: SD UNets whole, DiTs (Flux, Wan, "
                      "...) block by block, each block class compiled once (seconds); whole: the whole diffusion "
                      "model in one graph (minutes to compile for a DiT, can fuse more); blocks: block by block."}),
            "precision": (list(options.PRECISIONS), {"default": options.PRECISIONS[0], "tooltip":
                          "The linear layers' arithmetic (torch.compile backends). auto: the model's dtype; fp8: "
                          "weights and activations in fp8 with row-wise scales, GEMMs on fp8 tensor cores (GPUs "
                          "of compute capability 8.9+: Ada, Hopper, Blackwell), LoRA-safe; first/last, embedding "
                          "and modulation layers stay in the model's dtype. Elsewhere it runs the model's dtype "
                          "and says why."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "accelerate"
    CATEGORY = CATEGORY

    def accelerate(self, model, backend="auto", mode="default", dynamic="buckets", fallback="default",
                   keep_weights_on_gpu=False, scope="auto", precision="auto", unique_id=None):
        out, in_effect = accelerate(model, backend=backend, mode=mode, dynamic=dynamic, fallback=fallback,
                                    node_id=unique_id, get_store=comfy_store, keep_weights_on_gpu=keep_weights_on_gpu,
                                    scope=scope, precision=precision)
        return backend_node_result(out, "accelerate_model", in_effect)


NODE_CLASS_MAPPINGS = {"AccelAccelerateModel": AccelerateModel}
NODE_DISPLAY_NAME_MAPPINGS = {"AccelAccelerateModel": "Accelerate Model"}
