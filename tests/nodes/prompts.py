"""The API-format prompt most node tests queue: the small random SD1.5 UNet through one model node into
KSampler, the latent saved (so a test can read it back)."""


def sampling_prompt(node_class: str, node_inputs: dict, prefix: str, steps: int = 2, sampler_model=None) -> dict:
    """UNETLoader "1" → `node_class` "2" (its model input wired to "1") → KSampler "5" → SaveLatent "6".

    `sampler_model` is the KSampler's model link (default: node "2"), for graphs that add nodes after "2".
    """
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "accel_small_sd15.safetensors",
                                                      "weight_dtype": "default"}},
        "2": {"class_type": node_class, "inputs": {"model": ["1", 0], **node_inputs}},
        "3": {"class_type": "AccelTestConditioning", "inputs": {"seed": 1, "family": "sd15", "tokens": 77}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": sampler_model or ["2", 0], "seed": 3, "steps": steps,
                                                   "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }
