"""The random-weight model factory builds real, alive ComfyUI models and catches a missed parameter."""
import pytest
import torch


def test_tiny_models_are_real_comfy_models_and_alive(tiny_sd15, tiny_sdxl):
    import comfy.model_patcher
    import comfy.supported_models

    from tools.model_factory import assert_alive

    for model, family in ((tiny_sd15, comfy.supported_models.SD15), (tiny_sdxl, comfy.supported_models.SDXL)):
        assert isinstance(model, comfy.model_patcher.ModelPatcher)
        assert isinstance(model.model.model_config, family)
        stats = assert_alive(model)
        assert stats["mean_abs"] > 1e-3
        assert 0.05 < stats["response"] < 20


def test_initialisation_by_module_type_leaves_no_nan_and_sane_scales(tiny_sd15):
    params = dict(tiny_sd15.model.diffusion_model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    norms = [m for m in tiny_sd15.model.diffusion_model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    conv = tiny_sd15.model.diffusion_model.input_blocks[0][0]
    fan_in = conv.weight.shape[1:].numel()
    assert abs(conv.weight.std().item() * fan_in ** 0.5 - 1) < 0.3


def test_a_parameter_of_an_unknown_module_type_is_caught(comfy_path):
    from tools.model_factory import init_by_module_type

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Embedding(10, 4))
    with pytest.raises(RuntimeError, match="uninitialised.*1.weight"):
        init_by_module_type(module)


def test_dead_model_is_refused(comfy_path):
    from tools.model_factory import assert_alive, build_model

    model = build_model("tiny-sd15", check_alive=False)
    with torch.no_grad():
        for module in model.model.diffusion_model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.zero_()  # the name-based-init bug: ResBlock norms at zero
    with pytest.raises(AssertionError, match="dead|does not respond"):
        assert_alive(model)


def test_small_sd15_is_detected_by_comfyui_from_its_file(comfy_path, tmp_path):
    import comfy.sd
    import comfy.supported_models

    from tools.model_factory import build_model, save_unet

    path = save_unet(build_model("small-sd15"), tmp_path / "unet.safetensors")
    loaded = comfy.sd.load_diffusion_model(str(path))
    assert isinstance(loaded.model.model_config, comfy.supported_models.SD15)
