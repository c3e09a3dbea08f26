"""Tiny VAE on the real ComfyUI: random-weight TAESD files in ComfyUI's own format, its own VAE nodes."""
import pytest
import torch

from tools.taesd_factory import write_taesd_files


@pytest.fixture
def vae_approx(comfy_path, tmp_path, monkeypatch):
    """An empty models/vae_approx for this test only (ComfyUI's folder_paths pointed at it)."""
    import folder_paths

    folder = tmp_path / "vae_approx"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.delitem(folder_paths.filename_list_cache, "vae_approx", raising=False)
    return folder


def load(pack, family, model=None):
    from comfy_accel.accelerators.taesd import TinyVAEConfig, load_tiny_vae

    return load_tiny_vae(TinyVAEConfig(vae_family=family), model)


@pytest.mark.parametrize("family,prefix", [("sd", "taesd"), ("sdxl", "taesdxl")])
def test_decode_and_encode_through_comfyui_nodes(pack, vae_approx, family, prefix):
    import nodes

    write_taesd_files(vae_approx, family)
    vae = load(pack, family)
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    (image,) = nodes.VAEDecode().decode(vae, {"samples": latent})
    assert image.shape == (1, 64, 96, 3)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1 and image.std() > 0
    (encoded,) = nodes.VAEEncode().encode(vae, image)
    assert encoded["samples"].shape == (1, 4, 8, 12)
    assert torch.isfinite(encoded["samples"]).all()


@pytest.mark.parametrize("family,name,fmt", [("sd", "taesd", "safetensors"), ("sdxl", "taesdxl", "pth")])
def test_same_vae_as_comfyui_own_loader(pack, vae_approx, family, name, fmt):
    """ComfyUI's VAELoader offers the same files as "taesd"/"taesdxl": both VAEs decode identically."""
    import nodes

    write_taesd_files(vae_approx, family, fmt=fmt)
    assert name in nodes.VAELoader.vae_list(nodes.VAELoader)
    (reference,) = nodes.VAELoader().load_vae(name)
    ours = load(pack, family)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.decode(latent), reference.decode(latent))
    assert float(ours.first_stage_model.vae_scale.detach()) == float(reference.first_stage_model.vae_scale.detach())
    assert ours.accel_tiny_vae_family == family


def test_missing_files_name_the_files_and_the_folder(pack, vae_approx):
    from comfy_accel.accelerators.base import AcceleratorInputError

    with pytest.raises(AcceleratorInputError) as err:
        load(pack, "sdxl")
    message = str(err.value)
    assert "taesdxl_encoder" in message and "taesdxl_decoder" in message and str(vae_approx) in message


def test_half_a_pair_names_the_missing_half(pack, vae_approx):
    from comfy_accel.accelerators.base import AcceleratorInputError

    write_taesd_files(vae_approx, "sd", parts=("decoder",))
    for family in ("sd", "auto"):
        with pytest.raises(AcceleratorInputError, match=r"needs taesd_encoder\.safetensors \(or \.pth\) in ") as err:
            load(pack, family)
        assert "taesd_decoder" not in str(err.value)


def test_auto_takes_the_family_from_the_model(pack, vae_approx, tiny_sd15, tiny_sdxl):
    write_taesd_files(vae_approx, "sd")
    write_taesd_files(vae_approx, "sdxl", seed=3)
    assert load(pack, "auto", tiny_sdxl).accel_tiny_vae_family == "sdxl"
    assert load(pack, "auto", tiny_sd15).accel_tiny_vae_family == "sd"
    assert float(load(pack, "auto", tiny_sdxl).first_stage_model.vae_scale.detach()) == pytest.approx(0.13025)


def test_auto_without_a_model(pack, vae_approx):
    from comfy_accel.accelerators.base import AcceleratorInputError

    write_taesd_files(vae_approx, "sdxl")
    assert load(pack, "auto").accel_tiny_vae_family == "sdxl"  # the only family installed
    write_taesd_files(vae_approx, "sd")
    with pytest.raises(AcceleratorInputError, match="needs the model input connected"):
        load(pack, "auto")


def test_wrong_family_for_the_model_is_refused(pack, vae_approx, tiny_sdxl, tiny_sd15):
    from comfy_accel.accelerators.base import AcceleratorInputError

    write_taesd_files(vae_approx, "sd")
    write_taesd_files(vae_approx, "sdxl")
    with pytest.raises(AcceleratorInputError, match=r"'sd' .*does not match .*SDXL.*choose 'sdxl'"):
        load(pack, "sd", tiny_sdxl)
    with pytest.raises(AcceleratorInputError, match=r"'sdxl' .*does not match .*SD1.*choose 'sd'"):
        load(pack, "sdxl", tiny_sd15)


def test_weights_of_another_latent_family_are_refused(pack, vae_approx):
    """16-channel (TAESD3/TAEF1-shaped) weights saved under the SDXL name."""
    from comfy_accel.accelerators.base import AcceleratorInputError

    write_taesd_files(vae_approx, "sdxl", latent_channels=16)
    with pytest.raises(AcceleratorInputError, match="16-channel latents"):
        load(pack, "sdxl")


def test_a_file_that_is_not_taesd_is_refused(pack, vae_approx):
    import safetensors.torch

    from comfy_accel.accelerators.base import AcceleratorInputError

    write_taesd_files(vae_approx, "sd", parts=("encoder",))
    safetensors.torch.save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(vae_approx / "taesd_decoder.safetensors"))
    with pytest.raises(AcceleratorInputError, match=r"taesd_decoder .*is not a TAESD decoder state dict \(missing"):
        load(pack, "sd")


def test_a_model_without_a_tiny_vae_family_is_refused(pack, vae_approx):
    """An SD3-latent model (16 channels): no TAESD/TAESDXL can decode it."""
    from types import SimpleNamespace

    import comfy.latent_formats

    from comfy_accel.accelerators.base import AcceleratorInputError

    sd3_like = SimpleNamespace(model=SimpleNamespace(latent_format=comfy.latent_formats.SD3()))
    with pytest.raises(AcceleratorInputError, match="latent format is SD3"):
        load(pack, "auto", sd3_like)


def test_factory_vae_for_the_benchmark(pack):
    from tools.taesd_factory import make_tiny_vae

    vae = make_tiny_vae("sd15")
    image = vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape == (1, 64, 64, 3) and vae.accel_tiny_vae_family == "sd"
