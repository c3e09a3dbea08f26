"""Random-weight TAESD files in ComfyUI's own format, for the tests and the benchmark.

No TAESD weights can be downloaded here. ComfyUI reads `models/vae_approx/taesd_{encoder,decoder}.*`
(and `taesdxl_*`) as the plain state dicts of `comfy.taesd.taesd.Encoder` / `Decoder` (keys such as
`1.weight`, `3.conv.0.weight`), which is what these helpers write: the architecture comes from ComfyUI's
own classes, the weights from `model_factory.init_by_module_type` (alive, never NaN or zero).

    python -m tools.taesd_factory DIR [sd|sdxl]   # writes the two files into DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

PREFIXES = {"sd": "taesd", "sd15": "taesd", "sdxl": "taesdxl"}


def _family(family: str) -> str:
    if family not in PREFIXES:
        raise ValueError(f"family must be one of {', '.join(PREFIXES)}, got {family!r}")
    return "sdxl" if family == "sdxl" else "sd"


def taesd_state_dicts(seed: int = 0, latent_channels: int = 4) -> tuple[dict, dict]:
    """(encoder, decoder) state dicts of ComfyUI's TAESD architecture with random alive weights."""
    from tools.comfy_host import import_comfy
    from tools.model_factory import init_by_module_type

    import_comfy()
    from comfy.taesd.taesd import Decoder, Encoder

    states = []
    for offset, cls in enumerate((Encoder, Decoder)):
        module = cls(latent_channels=latent_channels)
        init_by_module_type(module, seed + offset)
        states.append({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    return states[0], states[1]


def write_taesd_files(folder, family: str = "sd", seed: int = 0, fmt: str = "safetensors",
                      parts=("encoder", "decoder"), latent_channels: int = 4) -> list[Path]:
    """Writes `<prefix>_<part>.<fmt>` (prefix taesd or taesdxl) into `folder`; returns the paths."""
    prefix = PREFIXES[family]
    encoder, decoder = taesd_state_dicts(seed, latent_channels)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in parts:
        state = encoder if part == "encoder" else decoder
        path = folder / f"{prefix}_{part}.{fmt}"
        if fmt == "safetensors":
            import safetensors.torch

            safetensors.torch.save_file(state, str(path))
        elif fmt in ("pth", "pt"):
            torch.save(state, path)
        else:
            raise ValueError(f"fmt must be safetensors, pth or pt, got {fmt!r}")
        paths.append(path)
    return paths


def make_tiny_vae(family: str = "sd", seed: int = 0, device=None):
    """A ComfyUI VAE object of the Tiny VAE (random weights), built by the pack's own loader path."""
    from tools.comfy_host import import_pack

    family = _family(family)
    encoder, decoder = taesd_state_dicts(seed)
    import_pack()
    from comfy_accel.accelerators.taesd import build_tiny_vae

    return build_tiny_vae(encoder, decoder, family, device=device)


if __name__ == "__main__":
    if not sys.argv[1:]:
        print(__doc__)
        sys.exit(2)
    for written in write_taesd_files(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sd"):
        print(written)
