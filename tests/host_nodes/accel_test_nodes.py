"""Test-only ComfyUI nodes, linked into the test server's custom_nodes (never shipped with the pack).

No text-encoder checkpoint can be downloaded here, so the HTTP workflows take their CONDITIONING from
this node: seeded random prompt embeddings shaped for SD1.5 (77×768) or SDXL (77×2048 + pooled 1280).
"""
import torch


class AccelTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 1, "min": 0, "max": 2**31}),
                             "family": (["sd15", "sdxl"], {"default": "sd15"}),
                             "tokens": ("INT", {"default": 77, "min": 77, "max": 231, "step": 77})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, family="sd15", tokens=77):
        gen = torch.Generator().manual_seed(seed)
        dim = 768 if family == "sd15" else 2048

        def one():
            extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if family == "sdxl" else {}
            return [[torch.randn(1, tokens, dim, generator=gen), extra]]

        return (one(), one())


NODE_CLASS_MAPPINGS = {"AccelTestConditioning": AccelTestConditioning}
