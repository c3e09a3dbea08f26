"""The tiny SD1.5 UNet that the precompile tests build once per module."""
import pytest

from tools.model_factory import build_model, unet_inputs


def tiny_unet_or_skip(ready, seed: int):
    """(model, its UNet, batch-2 inputs x, t, context at 64×64 px and 77 tokens): a model of the test module's own,
    because those tests edit its weights; skipped with the reason where `ready` (an Availability) says no."""
    if not ready:
        pytest.skip(ready.reason)
    model = build_model("tiny-sd15", seed=seed)
    return model, model.model.diffusion_model, tuple(unet_inputs(model, batch=2)[:3])
