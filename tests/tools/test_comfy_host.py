"""The host harness: COMFYUI_PATH handling, the horde copy's quirks, the pack link."""
import pytest


def test_missing_comfyui_path_gets_a_clear_message(monkeypatch, tmp_path):
    from tools.comfy_host import HostError, comfyui_path

    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(HostError, match="COMFYUI_PATH=.*does not exist"):
        comfyui_path()


def test_a_folder_that_is_not_comfyui_is_refused(monkeypatch, tmp_path):
    from tools.comfy_host import HostError, comfyui_path

    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(HostError, match="not a ComfyUI folder"):
        comfyui_path()


def test_unpacked_copy_has_quirks_applied_and_the_pack_linked(comfy_path):
    from tools.comfy_host import REPO_ROOT, prepare

    path = prepare()
    assert (path / "main.py").is_file()
    assert not (path / "extra_model_paths.yaml").exists()  # the horde copy's file crashes start-up
    link = path / "custom_nodes" / "comfy_accel"
    assert link.is_symlink() and link.resolve() == REPO_ROOT


def test_base_dir_links_the_pack(tmp_path):
    from tools.comfy_host import REPO_ROOT, make_base_dir

    base = make_base_dir(tmp_path / "base")
    assert (base / "custom_nodes" / "comfy_accel").resolve() == REPO_ROOT
    assert (base / "models" / "diffusion_models").is_dir()
