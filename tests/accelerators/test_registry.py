"""The accelerator interface: registry, availability reasons, and clear errors for bad input."""
import pytest


def test_every_accelerator_reports_availability_with_a_reason(pack):
    from comfy_accel.accelerators import registry

    rows = registry.status()
    assert any(row["name"] == "cfg_cutoff" for row in rows)
    for row in rows:
        assert isinstance(row["available"], bool)
        assert row["reason"], f"{row['name']} gives no reason"


def test_unknown_accelerator_names_the_known_ones(pack):
    from comfy_accel.accelerators import registry

    with pytest.raises(KeyError, match="unknown accelerator 'warp-drive'; known: .*cfg_cutoff"):
        registry.get("warp-drive")


def test_missing_optional_library_is_a_reason_not_an_import_error(pack):
    from comfy_accel.accelerators.base import module_available

    availability = module_available("surely_not_installed_lib", "surely-not-installed")
    assert not availability.ok
    assert availability.reason == "surely-not-installed not installed (pip install surely-not-installed)"


def test_sd_only_accelerator_refuses_a_non_unet_model_clearly(pack, tiny_sd15):
    from comfy_accel.accelerators.base import AcceleratorInputError, require_sd_unet
    from tools.model_factory import build_model

    assert require_sd_unet(tiny_sd15, "DeepCache") is tiny_sd15.model.diffusion_model
    flux = build_model("tiny-flux")
    with pytest.raises(AcceleratorInputError, match="DeepCache works on SD1.x/SD2.x/SDXL UNet models; this MODEL is Flux"):
        require_sd_unet(flux, "DeepCache")
    with pytest.raises(AcceleratorInputError, match="needs a MODEL"):
        require_sd_unet(object(), "DeepCache")


def test_step_of_maps_intermediate_sigmas_to_their_step(pack):
    import torch

    from comfy_accel.accelerators.sampling_progress import step_of

    sigmas = torch.tensor([14.6, 5.0, 2.0, 1.0, 0.0])
    assert step_of(torch.tensor([14.6]), sigmas) == (0, 4)
    assert step_of(torch.tensor([3.1]), sigmas) == (1, 4)   # Heun's second evaluation inside step 1
    assert step_of(torch.tensor([1.0]), sigmas) == (3, 4)
    assert step_of(torch.tensor([0.5]), sigmas) == (3, 4)
