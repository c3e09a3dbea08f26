"""FreeU: ComfyUI core's own FreeU / FreeU_V2 patch (an `output_block_patch`), honoured by every lane that
runs the UNet's block loop: eager, DeepCache (which calls the patch where the host does) and the compile lane
(traced into the graph). This module only lets callers without a node graph apply it, and lists it in
/accel/status; the patch itself is the host's.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import AcceleratorInputError, AcceleratorSpec, Availability, check_range


@dataclass
class FreeUConfig:
    version: str = "v2"            # "v1" = core FreeU, "v2" = core FreeU_V2
    b1: float = 1.3
    b2: float = 1.4
    s1: float = 0.9
    s2: float = 0.2

    def __post_init__(self):
        if self.version not in ("v1", "v2"):
            raise AcceleratorInputError(f"version must be 'v1' (FreeU) or 'v2' (FreeU_V2), got {self.version!r}")
        for name in ("b1", "b2", "s1", "s2"):
            setattr(self, name, check_range(name, getattr(self, name), 0.0, 10.0))


def apply_freeu(model, config: FreeUConfig):
    """ComfyUI's own FreeU / FreeU_V2 node patch (an output_block_patch), for use without the node graph."""
    from comfy_extras.nodes_freelunch import FreeU, FreeU_V2

    node = FreeU() if config.version == "v1" else FreeU_V2()
    return node.patch(model, config.b1, config.b2, config.s1, config.s2)[0]


def _freeu_available() -> Availability:
    return Availability(True, "core FreeU/FreeU_V2 are honoured eager, under DeepCache (called where the host "
                              "calls them) and in the compile lane (traced into the graph); a baked TensorRT "
                              "engine cannot apply them and says so")


ACCELERATOR_SPECS = [
    AcceleratorSpec(
        name="freeu", title="FreeU (core)",
        description="ComfyUI's FreeU/FreeU_V2 quality patch; kept working inside DeepCache and compiled paths.",
        config=FreeUConfig, available=_freeu_available, apply=apply_freeu, kind="model", lossless=True,
        order=55, not_idempotent="it adds the host's own FreeU patch, which stacks as two core FreeU nodes do")
]
