"""A random-weight SD1.5 *checkpoint* (CLIP-L + KL VAE + small UNet), written with ComfyUI's own classes.

The example workflows start from CheckpointLoaderSimple → CLIPTextEncode, as a person's workflow does; to
run them on CPU without downloading a model, this writes a checkpoint of the same layout with random
weights: the text encoder and VAE at their real sizes (the loaders detect them by shape), the UNet the
smallest one ComfyUI still detects as SD1.5 (`small-sd15` of tools/model_factory.py). `comfy.sd.save_checkpoint`
does the writing, so the key layout is ComfyUI's own. About 470 MB in fp16; built once and reused from
.host/checkpoints/ (git-ignored) while its version string matches.

    python -m tools.checkpoint_factory [path]
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
VERSION = "1"  # bump when the layout or the initialisation changes: cached files are then rebuilt
DEFAULT_PATH = REPO_ROOT / ".host" / "checkpoints" / f"accel_random_sd15_v{VERSION}.safetensors"


def init_text_encoder(module: torch.nn.Module, seed: int = 0) -> None:
    """Module-type init for a CLIP text model: norms 1/0, matrices N(0, 1/fan_in), embeddings N(0, 0.02)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm):
                sub.weight.fill_(1.0)
                sub.bias.zero_()
            elif isinstance(sub, torch.nn.Embedding):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.02)
            elif isinstance(sub, torch.nn.Linear):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) / math.sqrt(sub.weight.shape[1]))
                if sub.bias is not None:
                    sub.bias.zero_()
        for name, param in module.named_parameters():
            if not torch.isfinite(param).all():
                raise RuntimeError(f"text encoder parameter {name} left uninitialised")


def build_clip(model_patcher, seed: int = 0):
    """comfy.sd.CLIP of the checkpoint's family (SD1: CLIP-L) with random weights."""
    import comfy.sd

    target = model_patcher.model.model_config.clip_target({})
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    init_text_encoder(clip.cond_stage_model, seed)
    return clip


def write_checkpoint(path: Path | str = DEFAULT_PATH, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Builds and writes the checkpoint (atomically: a killed build leaves no half file)."""
    from tools.model_factory import build_model, build_vae

    import comfy.sd
    import comfy.utils

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model("small-sd15", seed=seed)
    clip = build_clip(model, seed + 1)
    vae = build_vae(seed + 2)
    state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    comfy.utils.save_torch_file(state, str(tmp), metadata={"comfy_accel": f"random-weight test checkpoint v{VERSION}"})
    os.replace(tmp, path)
    return path


def ensure_checkpoint(path: Path | str = DEFAULT_PATH) -> Path:
    """The cached checkpoint, built first when missing."""
    path = Path(path)
    if not path.is_file():
        from tools.comfy_host import import_comfy

        import_comfy()
        write_checkpoint(path)
    return path


if __name__ == "__main__":
    print(ensure_checkpoint(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH))
