"""Real ComfyUI model objects from random weights, for the tests and the benchmark.

No checkpoint can be downloaded here, so models are built with ComfyUI's own classes
(`comfy.supported_models.*` → `BaseModel` → `ModelPatcher`) and filled with random weights:
  tiny-sd15   SD1.5 architecture, 32 channels, context 64 (~1 M params; seconds on CPU)
  tiny-sdxl   SDXL architecture (linear transformers, ADM 2816), 64 channels, context 64
  small-sd15  the smallest shape ComfyUI still *detects* as SD1.5 (320 channels, one level, ~26 M params):
              saved as safetensors so the real UNETLoader loads it over HTTP
  sd15, sdxl  full size (860 M / 2.6 B params), for the GPU

Weights are initialised by module type, never by parameter name: everything is filled with NaN first,
then every GroupNorm/LayerNorm gets weight 1 and bias 0 and every conv/linear N(0, 1/fan_in) with bias 0,
and a NaN left anywhere is an error. (A name-based init once left the ResBlock norms at zero: the UNet then
outputs exactly 0 and every fidelity check passes vacuously.) `assert_alive` checks the result.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

_SD15 = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
         'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
         'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
         'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
         'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
         'use_temporal_attention': False, 'use_temporal_resblock': False}
_SDXL = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
         'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
         'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
         'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
         'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
         'use_temporal_attention': False, 'use_temporal_resblock': False}
_TINY = {'model_channels': 32, 'channel_mult': [1, 2], 'num_res_blocks': [1, 1], 'transformer_depth': [1, 1],
         'transformer_depth_output': [1, 1, 1, 1], 'transformer_depth_middle': 1, 'context_dim': 64}

MODEL_SPECS = {
    "tiny-sd15": ("SD15", {**_SD15, **_TINY}),
    # SDXL's config forces 64 channels per attention head, so its tiny variant needs 64 channels
    "tiny-sdxl": ("SDXL", {**_SDXL, **_TINY, 'model_channels': 64}),
    "small-sd15": ("SD15", {**_SD15, 'channel_mult': [1], 'num_res_blocks': [1], 'transformer_depth': [1],
                            'transformer_depth_output': [1, 1], 'transformer_depth_middle': 1}),
    "sd15": ("SD15", _SD15),
    "sdxl": ("SDXL", _SDXL),
    # not a UNet: for the "SD-only accelerator given another model" checks
    "tiny-flux": ("Flux", {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
                           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
                           "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                           "qkv_bias": True, "guidance_embed": True}),
}


def _comfy():
    from tools.comfy_host import import_comfy

    import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def init_by_module_type(module: torch.nn.Module, seed: int = 0) -> None:
    """NaN-fill, then initialise every parameter by the type of the module that owns it."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.fill_(float("nan"))
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)):
                if sub.weight is not None:
                    sub.weight.fill_(1.0)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
            elif type(sub).__name__ == "RMSNorm" and isinstance(getattr(sub, "scale", None), torch.nn.Parameter):
                sub.scale.fill_(1.0)  # ComfyUI's own RMSNorm (Flux, SD3) names its gain `scale`
            elif isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                weight = sub.weight
                fan_in = weight.shape[1:].numel()
                noise = torch.randn(weight.shape, generator=gen, dtype=torch.float32)
                weight.copy_((noise / math.sqrt(fan_in)).to(weight.dtype))
                if sub.bias is not None:
                    sub.bias.zero_()
        missed = [name for name, p in module.named_parameters() if torch.isnan(p).any()]
        if missed:
            raise RuntimeError(f"init_by_module_type left {len(missed)} parameters uninitialised, e.g. {missed[:5]}")


def build_model(name: str = "tiny-sd15", dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
                check_alive: bool = True):
    """A ComfyUI ModelPatcher of the named architecture with random (alive) weights."""
    comfy = _comfy()
    mm = comfy.model_management
    family, unet_config = MODEL_SPECS[name]
    config = getattr(comfy.supported_models, family)(copy.deepcopy(unet_config))
    config.set_inference_dtype(dtype, None)
    load_device = mm.get_torch_device() if device is None else torch.device(device)
    if load_device.type == mm.get_torch_device().type and load_device.index is None:
        load_device = mm.get_torch_device()  # "cuda" → ComfyUI's "cuda:0": its memory manager compares devices
    offload_device = mm.unet_offload_device()
    # Build and initialise where the weights will run (GPU init of 2.6 B params takes a second), then park
    # them on the offload device as ComfyUI's own loaders do.
    build_device = load_device if load_device.type == "cuda" else torch.device("cpu")
    base = config.get_model({}, device=build_device)
    base.diffusion_model.to(dtype)
    init_by_module_type(base.diffusion_model, seed)
    base = base.to(offload_device)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
    patcher.accel_factory_name = name  # lets benches and tests say which model they ran
    if check_alive and family != "Flux":
        assert_alive(patcher)
    return patcher


def unet_inputs(patcher, batch: int = 1, height: int = 64, width: int = 64, tokens: int = 77, seed: int = 0,
                device=None, dtype=None):
    """Random UNet inputs (x, timesteps, context, y) shaped for this model, in pixels → latent /8."""
    dm = patcher.model.diffusion_model
    gen = torch.Generator(device="cpu").manual_seed(seed)
    context_dim = _context_dim(dm)
    x = torch.randn(batch, 4, height // 8, width // 8, generator=gen)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, tokens, context_dim, generator=gen)
    y = torch.randn(batch, adm_channels(dm), generator=gen) if getattr(dm, "num_classes", None) else None
    dtype = dtype or dm.dtype
    move = lambda v: None if v is None else v.to(device or patcher.load_device, dtype)  # noqa: E731
    return move(x), t.to(device or patcher.load_device), move(context), move(y)


def adm_channels(dm) -> int:
    """Width of the SDXL-style ADM vector `y` (pooled text + size embeddings) the UNet expects."""
    return dm.label_emb[0][0].in_features


def _context_dim(dm) -> int:
    for module in dm.modules():
        if hasattr(module, "to_k") and module.__class__.__name__ == "CrossAttention":
            if module.to_k.in_features != module.to_q.in_features:
                return module.to_k.in_features
    return dm.input_blocks[0][0].weight.shape[0]  # never reached for SD models: they all cross-attend


def context_dim(patcher) -> int:
    return _context_dim(patcher.model.diffusion_model)


def check_alive(patcher, inputs, name: str, rel_low: float, rel_high: float) -> dict:
    """The diffusion model must answer: a finite, non-zero output of the latent's shape that moves when its latent
    input moves 1%. `inputs(patcher, device)` gives (x, timesteps, keyword inputs) for one call."""
    dm = patcher.model.diffusion_model
    device = patcher.load_device
    was = next(dm.parameters()).device
    dm.to(device)
    try:
        with torch.no_grad():
            x, t, kwargs = inputs(patcher, device)
            out = dm(x, t, **kwargs).float()
            out_moved = dm(x * 1.01, t, **kwargs).float()
    finally:
        dm.to(was)
    mean_abs = out.abs().mean().item()
    finite = bool(torch.isfinite(out).all())
    relative = ((out_moved - out).norm() / out.norm()).item() / 0.01 if mean_abs > 0 and finite else 0.0
    if not finite or mean_abs < 1e-4:
        raise AssertionError(f"{name} is dead: output mean |x| = {mean_abs:.3g} (finite={finite})")
    if not rel_low <= relative <= rel_high:
        raise AssertionError(f"{name} does not respond to its input: 1% input change moved the output {relative:.3g}%")
    if tuple(out.shape) != tuple(x.shape):
        raise AssertionError(f"{name} returned shape {tuple(out.shape)} for a latent of {tuple(x.shape)}")
    return {"mean_abs": mean_abs, "response": relative}


def assert_alive(patcher, rel_low: float = 0.05, rel_high: float = 20.0) -> dict:
    """The UNet must answer (`check_alive`)."""
    def inputs(patcher, device):
        x, t, context, y = unet_inputs(patcher, device=device)
        return x, t, {"context": context, "y": y}
    return check_alive(patcher, inputs, "UNet", rel_low, rel_high)


def make_conditioning(patcher, batch: int = 1, tokens: int = 77, seed: int = 1, width: int = 64, height: int = 64):
    """ComfyUI conditioning ([[tensor, dict]]) for positive and negative prompts, random but fixed by seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dim = context_dim(patcher)
    sdxl = getattr(patcher.model.diffusion_model, "num_classes", None) is not None

    def one():
        extra = {}
        if sdxl:
            extra = {"pooled_output": torch.randn(batch, 1280, generator=gen), "width": width, "height": height}
        return [[torch.randn(batch, tokens, dim, generator=gen), extra]]

    return one(), one()


def sample(patcher, steps: int = 6, cfg: float = 7.0, sampler: str = "euler", scheduler: str = "normal",
           seed: int = 0, width: int = 64, height: int = 64, batch: int = 1, positive=None, negative=None,
           tokens: int = 77, denoise: float = 1.0):
    """Runs ComfyUI's real sampler (comfy.sample.sample) and returns the final latent (float32, CPU), under
    torch.inference_mode as ComfyUI's executor runs every node (execution.py, PromptExecutor.execute_async): the
    model loads and LoRA patches then happen as in the host (e.g. its fp8 stochastic rounding needs no grad)."""
    _comfy()
    import comfy.sample

    if positive is None:
        positive, negative = make_conditioning(patcher, tokens=tokens, width=width, height=height)
    with torch.inference_mode():
        latent = torch.zeros(batch, 4, height // 8, width // 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                  denoise=denoise, seed=seed, disable_pbar=True)
        return out.float().cpu()


def save_unet(patcher, path: Path) -> Path:
    """Writes the UNet weights as safetensors in the layout ComfyUI's UNETLoader reads."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in patcher.model.diffusion_model.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    return path


def load_unet_as(patcher, weight_dtype: str, folder: Path, name: str = "accel_random_unet.safetensors"):
    """The same UNet weights loaded again through ComfyUI's own UNETLoader node with its `weight_dtype` choice
    (e.g. "fp8_e4m3fn_fast": fp8 weights, fp8 matrix multiplies on GPUs that have them): the ModelPatcher a
    user gets from that node."""
    _comfy()
    import folder_paths
    import nodes

    folder = Path(folder)
    save_unet(patcher, folder / name)
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return nodes.UNETLoader().load_unet(name, weight_dtype)[0]


_SD_VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                    'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def build_vae(seed: int = 0, device=None):
    """The full SD/SDXL KL VAE (83 M params) with random weights, as ComfyUI's own comfy.sd.VAE object."""
    _comfy()
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device(device or "cpu"):
        autoencoder = AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
    init_by_module_type(autoencoder, seed)
    state = {k: v.detach().cpu() for k, v in autoencoder.state_dict().items()}
    return comfy.sd.VAE(sd=state)


ATTENTION_PROJECTIONS = (".to_q.weight", ".to_k.weight", ".to_v.weight")
FEED_FORWARDS = (".ff.net.0.proj.weight", ".ff.net.2.weight")


def random_lora(patcher, layers: int = 16, rank: int = 8, seed: int = 11, scale: float = 0.3,
                feed_forward: bool = False) -> dict:
    """A LoRA state dict in kohya format (ComfyUI's `load_lora_for_models` reads it) over the first `layers`
    attention projections of the UNet (what the benchmark applies to time a LoRA change) or, `feed_forward`, its
    attention projections and feed-forward Linears (the layers precision fp8 routes in a UNet)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    suffixes = ATTENTION_PROJECTIONS + (FEED_FORWARDS if feed_forward else ())
    keys = [k for k, v in patcher.model.state_dict().items() if k.endswith(suffixes) and v.dim() == 2][:layers]
    for key in keys:
        out_ch, in_ch = patcher.model.state_dict()[key].shape
        name = "lora_unet_" + key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn((rank, in_ch), generator=gen) * scale
        lora[f"{name}.lora_up.weight"] = torch.randn((out_ch, rank), generator=gen) * scale
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora
