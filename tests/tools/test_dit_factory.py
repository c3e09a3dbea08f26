"""The DiT factory builds real, alive ComfyUI models of every family, with the host's own dtype rules."""
import pytest
import torch

from tools.dit_factory import DIT_SPECS

TINY = [name for name in DIT_SPECS if name.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_family_is_the_hosts_model_alive_and_samples(comfy_path, name):
    import comfy.model_patcher
    import comfy.supported_models

    from tools.dit_factory import assert_dit_alive, build_dit, latent_shape, sample_dit

    model = build_dit(name)
    spec = DIT_SPECS[name]
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert type(model.model.model_config) is getattr(comfy.supported_models, spec.config_class)
    assert all(torch.isfinite(p).all() for p in model.model.diffusion_model.parameters())
    stats = assert_dit_alive(model)
    assert stats["mean_abs"] > 1e-2 and 0.01 < stats["response"] < 50
    frames = 2 if spec.video else 1
    out = sample_dit(model, steps=1, frames=frames, height=8, width=6)
    assert out.shape == latent_shape(model, 1, 8, 6, frames)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-2


def test_raw_tables_are_initialised_and_wan_keeps_its_fp32_patch_embedding(comfy_path):
    """Wan's per-block `modulation` tables are raw Parameters (no Linear/Norm owns them) and Wan builds its patch
    embedding in fp32 whatever the weight dtype (it runs it on x.float()): both hold for a bf16 build."""
    from tools.dit_factory import build_dit, sample_dit

    model = build_dit("tiny-wan21", dtype=torch.bfloat16)
    dm = model.model.diffusion_model
    assert dm.patch_embedding.weight.dtype == torch.float32
    assert dm.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    width = dm.blocks[0].modulation.shape[-1]
    assert abs(dm.blocks[0].modulation.float().std().item() * width ** 0.5 - 1) < 0.3
    assert torch.isfinite(sample_dit(model, steps=1, frames=2)).all()


def test_a_buffer_a_checkpoint_provides_is_initialised(comfy_path):
    """SD3 builds its positional table as a torch.empty buffer (a checkpoint fills it): uninitialised memory made
    random SD3s NaN now and then until the factory filled it like a raw table."""
    from tools.dit_factory import build_dit

    pos_embed = build_dit("tiny-sd3", seed=0).model.diffusion_model.pos_embed
    assert torch.isfinite(pos_embed).all() and abs(pos_embed.std().item() * pos_embed.shape[-1] ** 0.5 - 1) < 0.1


def test_a_dead_dit_is_refused(comfy_path):
    from tools.dit_factory import assert_dit_alive, build_dit

    model = build_dit("tiny-flux-dev", check_alive=False)
    with torch.no_grad():
        model.model.diffusion_model.final_layer.linear.weight.zero_()
    with pytest.raises(AssertionError, match="dead"):
        assert_dit_alive(model)


def test_a_parameter_left_uninitialised_is_caught(comfy_path):
    """A Linear that owns one more parameter than weight and bias (as scaled-fp8 layers do) keeps its NaN."""
    from tools.dit_factory import init_dit_by_module_type

    class ScaledLinear(torch.nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            self.scale_weight = torch.nn.Parameter(torch.ones(()))

    with pytest.raises(RuntimeError, match="uninitialised.*scale_weight"):
        init_dit_by_module_type(torch.nn.Sequential(ScaledLinear()))
