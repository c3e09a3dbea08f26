"""A random-weight SD1.x checkpoint the AUTOMATIC1111 WebUI loads, built with the WebUI's own `ldm` classes.

Run with the WebUI's Python from its checkout (tools/webui_host.py does):

    cd $WEBUI_PATH && venv/bin/python <repo>/tools/webui_checkpoint.py <out.safetensors> <hf_home>

Writes `<out>.safetensors` in the original-LDM layout (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.transformer.` and the noise-schedule buffers A1111 reads) and `<out>.yaml` beside it (A1111 takes
a checkpoint's config from there): a small UNet (two levels, one res block each) and a small VAE so that CPU jobs take
seconds, and a 2-layer CLIP-L-width text encoder whose config goes into an offline Hugging Face cache at `hf_home`
with the SD1 tokenizer files (copied from ComfyUI's `comfy/sd1_tokenizer`, which are CLIP-L's).

Initialised by module type (norm weights 1, linear/conv N(0, 1/fan_in), embeddings N(0, 0.02)) after filling
everything with NaN, then checked: no NaN left and the UNet is alive (non-zero output that moves with its input).
Two traps the first run here found: the schedule buffers must be in the file, and the text encoder's
`final_layer_norm.bias` must not be 0 (A1111's emphasis rescales the CLIP output by a ratio of means: 0/0).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

CLIP_REPO = "openai/clip-vit-large-patch14"
SNAPSHOT = "0" * 40
UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": False,
        "legacy": False}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
CLIP_LAYERS = 2


def tokenizer_source() -> Path:
    """ComfyUI's copy of the CLIP-L tokenizer files (COMFYUI_PATH, else the repository's .host/ComfyUI)."""
    repo = Path(__file__).resolve().parent.parent
    for root in (os.environ.get("COMFYUI_PATH"), repo / ".host" / "ComfyUI"):
        if root and (Path(root) / "comfy" / "sd1_tokenizer" / "vocab.json").is_file():
            return Path(root) / "comfy" / "sd1_tokenizer"
    raise SystemExit("no CLIP tokenizer files: set COMFYUI_PATH to a ComfyUI checkout (comfy/sd1_tokenizer/)")


def write_hf_cache(hf_home: Path):
    """An offline Hugging Face cache holding CLIP-L's tokenizer and a small text-model config."""
    from transformers import CLIPConfig

    repo = hf_home / "hub" / f"models--{CLIP_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    source = tokenizer_source()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(source / name, snapshot / name)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 77
    (snapshot / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    config = CLIPConfig(text_config={"num_hidden_layers": CLIP_LAYERS, "hidden_size": 768,
                                     "intermediate_size": 3072, "num_attention_heads": 12,
                                     "projection_dim": 768, "hidden_act": "quick_gelu"},
                        vision_config={"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                                       "num_attention_heads": 2, "patch_size": 14, "image_size": 224},
                        projection_dim=768)
    config.save_pretrained(snapshot)
    return config


def init_by_type(module, seed: int = 0) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            bias = getattr(sub, "bias", None)
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if weight is not None:
                    weight.fill_(1.0)
                if bias is not None:
                    bias.zero_()
            elif isinstance(sub, torch.nn.Embedding):
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.02)
            elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=gen) / math.sqrt(fan_in))
                if bias is not None:
                    bias.zero_()
        for name, p in module.named_parameters():
            if torch.isnan(p).any():
                raise RuntimeError(f"parameter {name} was not initialised (no rule for its module type)")


def build(out: Path, hf_home: Path) -> None:
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    sys.path.insert(0, str(Path.cwd() / "repositories" / "stable-diffusion-stability-ai"))
    from ldm.util import instantiate_from_config

    config = yaml.safe_load(Path("configs/v1-inference.yaml").read_text())
    params = config["model"]["params"]
    params["unet_config"]["params"] = UNET
    params["first_stage_config"]["params"]["ddconfig"] = VAE_DDCONFIG
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    clip_config = write_hf_cache(hf_home)
    params = dict(params, cond_stage_config="__is_unconditional__")
    model = instantiate_from_config({"target": config["model"]["target"], "params": params})
    init_by_type(model, seed=1)
    text = CLIPTextModel(clip_config.text_config)
    init_by_type(text, seed=2)
    with torch.no_grad():
        text.text_model.final_layer_norm.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))

    unet = model.model.diffusion_model.eval()
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8)
        t = torch.tensor([500])
        context = torch.randn(1, 77, 768)
        a, b = unet(x, t, context), unet(x * 0.5, t, context)
    if not (a.abs().max() > 0 and (a - b).abs().max() > 0 and torch.isfinite(a).all()):
        raise RuntimeError("the random UNet is dead (zero or constant output)")

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("model_ema")}
    state.update({f"cond_stage_model.transformer.{k}": v.contiguous() for k, v in text.state_dict().items()})
    if "alphas_cumprod" not in state:
        raise RuntimeError("the noise-schedule buffers are missing from the state dict")
    save_file(state, str(out))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB, {len(state)} tensors)")


if __name__ == "__main__":
    build(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
