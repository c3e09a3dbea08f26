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



def test_a_dropped_cyclic_chain_costs_every_later_sample_a_full_gc_until_forgotten(pack, caplog):
    """What the benches clear between stacks (comfy_host.forget_dropped_models), on the real host: a clone of a
    clone that refers to itself (what the pack's own clones did until stand_in.py held them weakly; any node's
    may), sampled then dropped, is freed by the garbage collector and leaves ComfyUI a dead record; each later
    sample logs ComfyUI's "memory leak" warning (its full gc.collect). Forgotten, the next sample runs without."""
    import gc
    import logging

    import comfy.model_management as mm

    from tools.comfy_host import forget_dropped_models
    from tools.dit_factory import build_dit, sample_dit

    base = build_dit("tiny-flux-dev", seed=1)
    chained = base.clone().clone()
    chained.refers_to_itself = chained
    sample_dit(chained, steps=1)
    del chained
    gc.collect()
    assert any(loaded.is_dead() and loaded.real_model() is base.model for loaded in mm.current_loaded_models)
    with caplog.at_level(logging.WARNING):
        sample_dit(base, steps=1)
    assert "memory leak with model Flux" in caplog.text
    assert forget_dropped_models() >= 1
    assert not any(loaded.is_dead() for loaded in mm.current_loaded_models)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample_dit(base, steps=1)
    assert "memory leak" not in caplog.text
