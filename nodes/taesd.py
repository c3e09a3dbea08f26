"""Node "Tiny VAE": a TAESD/TAESDXL VAE from models/vae_approx, for VAEDecode/VAEEncode."""
from __future__ import annotations

from ..accelerators.taesd import FAMILY_CHOICES, TinyVAEConfig, load_tiny_vae
from .common import CATEGORY


class TinyVAE:
    DESCRIPTION = ("Loads the tiny autoencoder (TAESD for SD1.x/2.x, TAESDXL for SDXL) from models/vae_approx "
                   "as a VAE: much faster decoding with far less memory, slightly softer images. 'auto' takes "
                   "the family from the connected MODEL (a latent does not say which model made it); without "
                   "a MODEL it uses the only family installed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_family": (list(FAMILY_CHOICES), {"default": "auto",
                                                   "tooltip": "sd = taesd_* files, sdxl = taesdxl_* files, auto = "
                                                              "from the MODEL input (or the only one installed)."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The model whose latents this VAE will decode: picks the family "
                                           "for 'auto' and catches a wrong family."}),
        }}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, vae_family, model=None):
        return (load_tiny_vae(TinyVAEConfig(vae_family=vae_family), model),)


NODE_CLASS_MAPPINGS = {"AccelTinyVAE": TinyVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"AccelTinyVAE": "Tiny VAE"}
