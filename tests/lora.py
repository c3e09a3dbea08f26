"""A real ComfyUI LoRA for the tiny SD1.5 model (kohya format, loaded by comfy.sd.load_lora_for_models)."""
import torch

TARGETS = {  # ComfyUI LoRA key → UNet key: a cross-attention Linear, a feed-forward Linear, a 1×1 and a 3×3 conv
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_input_blocks_1_1_transformer_blocks_0_ff_net_2": "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
    "lora_unet_input_blocks_1_1_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
    "lora_unet_output_blocks_0_0_in_layers_2": "diffusion_model.output_blocks.0.0.in_layers.2.weight",
}
BIAS_DIFF = ("lora_unet_input_blocks_1_0_out_layers_3", "diffusion_model.input_blocks.1.0.out_layers.3.bias")


def make_lora(patcher, names, rank=4, seed=7, with_bias=True):
    """A LoRA file's state dict in ComfyUI's kohya format (lora_up/lora_down/alpha, diff_b for a bias)."""
    gen = torch.Generator().manual_seed(seed)
    sd = patcher.model.state_dict()
    lora = {}
    for lora_key in names:
        weight = sd[TARGETS[lora_key]]
        out_ch, in_ch = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        lora[f"{lora_key}.lora_down.weight"] = torch.randn((rank, in_ch, *kernel), generator=gen) * 0.3
        lora[f"{lora_key}.lora_up.weight"] = torch.randn((out_ch, rank, *((1,) * len(kernel))), generator=gen) * 0.3
        lora[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    if with_bias:
        lora[f"{BIAS_DIFF[0]}.diff_b"] = torch.randn(sd[BIAS_DIFF[1]].shape, generator=gen) * 0.5
    return lora


def with_lora(patcher, lora, strength=1.0):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0.0)
    return patched
