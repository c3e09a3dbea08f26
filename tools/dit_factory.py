"""Real ComfyUI DiT models (Flux, SD3, Qwen-Image, Wan, ...) from random weights, for the tests and the benchmark.

Each family is built with ComfyUI's own classes, as its loader does: the `comfy.supported_models` config of the
family with a (shrunk) `unet_config`, `set_inference_dtype` with the host's own manual-cast choice, then
`get_model`, so the family's dtype rules hold (Wan builds its patch embedding in fp32 and runs it in fp32;
casting the whole model would break it). Weights are initialised by module type after a NaN fill, as in
`model_factory`, plus the raw parameters no Linear/Norm owns (Wan's `modulation` tables, LTXV's
`scale_shift_table`, Lumina's pad tokens, HiDream's expert gate) and the buffers a checkpoint provides (SD3's
`pos_embed`, otherwise uninitialised memory): N(0, 1/width). `assert_dit_alive` checks
every family: a finite, non-zero output that moves with its input.

Sizes below are in latent units (a latent of height×width, `frames` latent frames for video models).
  tiny-*      two of each repeated block, widths 64..128: a second or less per call on a CPU
  flux-dev, flux-schnell, wan21-1.3b   full size, for the GPU (build them there: `device="cuda"`)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DitSpec:
    config_class: str          # comfy.supported_models class
    unet_config: dict
    channels: int              # latent channels
    context_dim: int           # text embedding width (the `c_crossattn` a text encoder would give)
    video: bool = False        # frames in the latent: [batch, channels, frames, height, width]
    pooled_dim: int = 0        # `pooled_output` width (the host's encode_adm reads it), 0 for none
    takes_y: bool = True       # the pooled output reaches the model as `y`
    five_d: bool = False       # an image model on 5-D latents (one frame), as the host's empty latent gives it
    cond: dict = field(default_factory=dict)   # extra conditioning entries (guidance, frame_rate, ...)
    min_tokens: int = 0        # the model pads the text to this many tokens anyway (Flux2: 512)


_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
         "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
         "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
_FLUX2 = {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
          "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2,
          "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1, "qkv_bias": False,
          "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
          "default_ref_method": "index", "ref_index_scale": 10.0}
_CHROMA = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64,
           "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
           "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
           "n_layers": 2}
_SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 32,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
        "pos_embed_max_size": 32, "num_patches": 1024, "pos_embed_scaling_factor": None, "qk_norm": "rms",
        "x_block_self_attn_layers": [], "input_size": None}
_QWEN = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
         "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [8, 12, 12]}
_LUMINA2 = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2,
            "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 4.0,
            "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512]}
# Z-Image's modulation takes a 256-wide time embedding: its width cannot go below 256
_ZIMAGE = {**_LUMINA2, "dim": 256, "n_kv_heads": 2, "axes_dims": [32, 48, 48], "ffn_dim_multiplier": 8.0 / 3.0,
           "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
_WAN21 = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 64,
          "ffn_dim": 128, "freq_dim": 256, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2,
          "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
_HUNYUAN = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
            "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
            "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
            "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
            "use_cond_type_embedding": False, "vision_in_dim": None}
_LTXV = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
         "num_attention_heads": 2, "caption_channels": 32, "num_layers": 2}
_HIDREAM = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
            "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [32, 32],
            "text_emb_dim": 32, "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [16, 8, 8],
            "max_resolution": [128, 128], "llama_layers": [0, 1, 1, 1]}
HIDREAM_LLAMA_LAYERS = 2   # hidden states of the (random) Llama text encoder: conditioning_llama3[:, layer]
# FLUX.1 [dev] / [schnell] at full size (11.9 B parameters)
_FLUX1_FULL = {"vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
               "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56]}

DIT_SPECS = {
    "tiny-flux-dev": DitSpec("Flux", _FLUX, 16, 32, pooled_dim=32, cond={"guidance": 3.5}),
    "tiny-flux-schnell": DitSpec("FluxSchnell", {**_FLUX, "guidance_embed": False}, 16, 32, pooled_dim=32),
    "tiny-flux2": DitSpec("Flux2", _FLUX2, 128, 32, pooled_dim=32, takes_y=False, cond={"guidance": 4.0},
                          min_tokens=512),
    "tiny-chroma": DitSpec("Chroma", _CHROMA, 16, 32, pooled_dim=32, takes_y=False),
    "tiny-sd3": DitSpec("SD3", _SD3, 16, 32, pooled_dim=32),
    "tiny-qwen-image": DitSpec("QwenImage", _QWEN, 16, 32, five_d=True),
    "tiny-lumina2": DitSpec("Lumina2", _LUMINA2, 16, 32),
    "tiny-z-image": DitSpec("ZImage", _ZIMAGE, 16, 32),
    "tiny-hidream": DitSpec("HiDream", _HIDREAM, 16, 32, pooled_dim=32),
    "tiny-wan21": DitSpec("WAN21_T2V", _WAN21, 16, 32, video=True),
    "tiny-hunyuan-video": DitSpec("HunyuanVideo", _HUNYUAN, 16, 32, video=True, pooled_dim=32,
                                  cond={"guidance": 6.0}),
    "tiny-ltxv": DitSpec("LTXV", _LTXV, 128, 32, video=True, cond={"frame_rate": 25}),
    # full size, for the GPU
    "flux-dev": DitSpec("Flux", {**_FLUX, **_FLUX1_FULL}, 16, 4096, pooled_dim=768, cond={"guidance": 3.5}),
    "flux-schnell": DitSpec("FluxSchnell", {**_FLUX, **_FLUX1_FULL, "guidance_embed": False}, 16, 4096,
                            pooled_dim=768),
    "wan21-1.3b": DitSpec("WAN21_T2V", {**_WAN21, "dim": 1536, "ffn_dim": 8960, "text_dim": 4096, "num_heads": 12,
                                        "num_layers": 30}, 16, 4096, video=True),
}
# short names the bench and the demo take (`./run_demo.sh --model flux`)
MODEL_ALIASES = {"flux": "flux-dev", "wan": "wan21-1.3b"}


def _comfy():
    from tools.comfy_host import import_comfy

    import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def _is_norm(module) -> bool:
    return isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)) \
        or "Norm" in type(module).__name__


def init_dit_by_module_type(module: torch.nn.Module, seed: int = 0) -> None:
    """NaN-fill; norms' gains 1 and biases 0, conv/linear N(0, 1/fan_in) with bias 0, embeddings N(0, 1), any other
    parameter (a raw table no such module owns) and any buffer a checkpoint provides (SD3's `pos_embed`, built
    with torch.empty) N(0, 1/width); a NaN left anywhere is an error. Random numbers are drawn where the weights
    live (a CPU generator for 12 B parameters takes minutes)."""
    first = next(module.parameters())
    gen = torch.Generator(device=first.device).manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, device=first.device, dtype=torch.float32) * std

    params = dict(module.named_parameters())
    stored = {name: tensor for name, tensor in module.state_dict(keep_vars=True).items()
              if name not in params and tensor.is_floating_point()}
    with torch.no_grad():
        for tensor in (*params.values(), *stored.values()):
            tensor.fill_(float("nan"))
        for sub in module.modules():
            own = dict(sub.named_parameters(recurse=False))
            if not own:
                continue
            if _is_norm(sub):
                for name, param in own.items():
                    param.fill_(0.0 if name == "bias" else 1.0)
            elif isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                sub.weight.copy_(normal(sub.weight.shape, 1 / math.sqrt(sub.weight.shape[1:].numel())))
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, torch.nn.Embedding):
                sub.weight.copy_(normal(sub.weight.shape, 1.0))
            else:
                for param in own.values():
                    if torch.isnan(param).all():
                        param.copy_(normal(param.shape, 1 / math.sqrt(param.shape[-1])))
        for tensor in stored.values():
            tensor.copy_(normal(tensor.shape, 1 / math.sqrt(tensor.shape[-1])))
        missed = [name for name, p in (*params.items(), *stored.items()) if torch.isnan(p).any()]
        if missed:
            raise RuntimeError(f"init_dit_by_module_type left {len(missed)} parameters uninitialised, "
                               f"e.g. {missed[:5]}")


# The timestep-embedding module of each family that has one under these names (`smooth` scales it down).
TIME_EMBEDDINGS = ("time_in", "time_embedding", "t_embedder", "time_text_embed")
SMOOTH_TIME_SCALE = 0.1


def smooth_time_response(diffusion_model, scale: float = SMOOTH_TIME_SCALE) -> None:
    """Scales the Linear weights of the timestep embedding by `scale`. Random weights make the modulation, and so
    the prediction, jump between adjacent steps (on a random FLUX.1-dev core's EasyCache skipped no step); a
    trained model's prediction moves slowly along the sampling path. This damping gives the step caches a model
    whose step-to-step change resembles a trained one's, while it still answers its latent input."""
    found = [getattr(diffusion_model, name) for name in TIME_EMBEDDINGS if hasattr(diffusion_model, name)]
    if not found:
        raise ValueError(f"{type(diffusion_model).__name__} has none of {TIME_EMBEDDINGS}: no smooth variant")
    with torch.no_grad():
        for module in found[0].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(scale)


def build_dit(name: str = "tiny-flux-dev", dtype: torch.dtype = torch.float32, device=None, seed: int = 0,
              check_alive: bool = True, smooth: bool = False):
    """A ComfyUI ModelPatcher of the named DiT family with random (alive) weights, built as the host's loader
    builds it: the family's config, the host's weight/compute dtype rules, `get_model`. `smooth`: the timestep
    response damped (smooth_time_response), for the step caches' tests."""
    comfy = _comfy()
    mm = comfy.model_management
    spec = DIT_SPECS[name]
    config = getattr(comfy.supported_models, spec.config_class)(copy.deepcopy(spec.unet_config))
    load_device = mm.get_torch_device() if device is None else torch.device(device)
    if load_device.type == mm.get_torch_device().type and load_device.index is None:
        load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    offload_device = mm.unet_offload_device()
    build_device = load_device if load_device.type == "cuda" else torch.device("cpu")
    base = config.get_model({}, device=build_device)
    init_dit_by_module_type(base.diffusion_model, seed)
    if smooth:
        smooth_time_response(base.diffusion_model)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
    patcher.accel_factory_name = name
    base.accel_factory_name = name   # the BaseModel is shared by every clone (LoRA loaders, accelerators)
    if check_alive:
        assert_dit_alive(patcher)   # where it was built: a 12 B model is not moved twice more for it
    base.to(offload_device)   # parked as ComfyUI's loaders leave it; sampling loads it
    return patcher


def spec_of(patcher) -> DitSpec:
    return DIT_SPECS[patcher.model.accel_factory_name]


def latent_shape(patcher, batch: int = 1, height: int = 8, width: int = 8, frames: int = 1) -> tuple:
    spec = spec_of(patcher)
    if spec.video or spec.five_d:
        return (batch, spec.channels, frames if spec.video else 1, height, width)
    return (batch, spec.channels, height, width)


def make_dit_conditioning(patcher, batch: int = 1, tokens: int = 8, seed: int = 1):
    """ComfyUI conditioning ([[tensor, dict]]) for positive and negative prompts, as the family's text encoders
    would give them (random but fixed by seed): what `comfy.sample.sample` turns into the model's inputs."""
    spec = spec_of(patcher)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def one():
        extra = dict(spec.cond)
        if spec.pooled_dim:
            extra["pooled_output"] = torch.randn(batch, spec.pooled_dim, generator=gen)
        if spec.config_class == "LTXV":
            extra["attention_mask"] = torch.ones(batch, tokens)
        if spec.config_class == "HiDream":
            extra["conditioning_llama3"] = torch.randn(batch, HIDREAM_LLAMA_LAYERS, tokens, 32, generator=gen)
        return [[torch.randn(batch, tokens, spec.context_dim, generator=gen), extra]]

    return one(), one()


def dit_inputs(patcher, batch: int = 1, height: int = 8, width: int = 8, frames: int = 1, tokens: int = 8,
               seed: int = 0, device=None):
    """(x, timesteps, kwargs) for one direct call `diffusion_model(x, timesteps, **kwargs)`: the inputs
    BaseModel.apply_model derives from the conditioning above (`context`, `y`, guidance, ...)."""
    spec = spec_of(patcher)
    dm = patcher.model.diffusion_model
    device = device or patcher.load_device
    dtype = patcher.model.get_dtype() if patcher.model.manual_cast_dtype is None else patcher.model.manual_cast_dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    positive, _ = make_dit_conditioning(patcher, batch, tokens, seed + 1)
    context, extra = positive[0]
    x = torch.randn(latent_shape(patcher, batch, height, width, frames), generator=gen)
    kwargs = {"context": context}
    if spec.pooled_dim and spec.takes_y:
        kwargs["y"] = extra["pooled_output"]
    if "guidance" in spec.cond:
        kwargs["guidance"] = torch.full((batch,), float(spec.cond["guidance"]))
    if spec.config_class == "Chroma":
        kwargs["guidance"] = torch.zeros(batch)
    if spec.config_class in ("Lumina2", "ZImage"):
        kwargs["num_tokens"] = tokens
    if spec.config_class == "LTXV":
        kwargs["attention_mask"] = extra["attention_mask"]
        kwargs["frame_rate"] = spec.cond["frame_rate"]
    if spec.config_class == "HiDream":
        kwargs["encoder_hidden_states_llama3"] = extra["conditioning_llama3"]
    if spec.min_tokens and tokens < spec.min_tokens:
        kwargs["context"] = torch.nn.functional.pad(context, (0, 0, spec.min_tokens - tokens, 0))
    move = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "guidance"
            else v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    del dm
    return x.to(device, dtype), torch.full((batch,), 0.5, device=device), move


def assert_dit_alive(patcher, rel_low: float = 0.01, rel_high: float = 50.0) -> dict:
    """The DiT must answer (`model_factory.check_alive`), with its family's inputs."""
    from tools.model_factory import check_alive

    name = getattr(patcher.model, "accel_factory_name", type(patcher.model.diffusion_model).__name__)
    return check_alive(patcher, lambda p, device: dit_inputs(p, device=device), name, rel_low, rel_high)


def sample_dit(patcher, steps: int = 2, cfg: float = 1.0, sampler: str = "euler", scheduler: str = "simple",
               seed: int = 0, height: int = 8, width: int = 8, frames: int = 1, batch: int = 1, tokens: int = 8,
               positive=None, negative=None):
    """ComfyUI's real sampler (comfy.sample.sample) on this DiT, under inference_mode like the executor;
    returns the final latent (float32, CPU)."""
    _comfy()
    import comfy.sample

    if positive is None:
        positive, negative = make_dit_conditioning(patcher, batch, tokens)
    with torch.inference_mode():
        latent = torch.zeros(latent_shape(patcher, batch, height, width, frames))
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                  seed=seed, disable_pbar=True)
        return out.float().cpu()


def random_dit_lora(patcher, per_list: int = 2, rank: int = 4, seed: int = 7, scale: float = 0.3) -> dict:
    """A LoRA state dict in the generic `diffusion_model.<layer>.lora_up/lora_down` format ComfyUI's LoRA loader
    maps for every model, over the first `per_list` Linear layers of the first and last block of each repeated
    block list (so a LoRA on compiled blocks shows whether it reaches the output)."""
    from accelerators.compile.dit import repeated_blocks

    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, blocks in repeated_blocks(patcher.model.diffusion_model):
        for index in sorted({0, len(blocks) - 1}):
            linears = [(n, m) for n, m in blocks[index].named_modules() if isinstance(m, torch.nn.Linear)][:per_list]
            for layer, module in linears:
                key = f"diffusion_model.{name}.{index}.{layer}"
                out_ch, in_ch = module.weight.shape
                lora[f"{key}.lora_down.weight"] = torch.randn((rank, in_ch), generator=gen) * scale
                lora[f"{key}.lora_up.weight"] = torch.randn((out_ch, rank), generator=gen) * scale
                lora[f"{key}.alpha"] = torch.tensor(float(rank))
    return lora
