"""The DeepCache and Tiny VAE nodes: in-process, and in a real ComfyUI server over HTTP."""
from pathlib import Path

import pytest
import torch

from tests.nodes.prompts import sampling_prompt


def test_nodes_are_registered_with_their_names(pack):
    from comfy_accel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from comfy_accel.nodes.common import CATEGORY

    for key, title in (("AccelDeepCache", "DeepCache"), ("AccelTinyVAE", "Tiny VAE")):
        assert NODE_DISPLAY_NAME_MAPPINGS[key] == title
        assert NODE_CLASS_MAPPINGS[key].CATEGORY == CATEGORY
    inputs = NODE_CLASS_MAPPINGS["AccelTinyVAE"].INPUT_TYPES()
    assert inputs["required"]["vae_family"][0] == ["auto", "sd", "sdxl"]
    assert inputs["optional"]["model"][0] == "MODEL"


def test_deepcache_node_patches_a_clone_and_records_it(pack, tiny_sd15):
    from comfy_accel.accelerators.deepcache import deepcache_state, has_deepcache
    from comfy_accel.nodes import NODE_CLASS_MAPPINGS

    node = NODE_CLASS_MAPPINGS["AccelDeepCache"]()
    (patched,) = node.patch(tiny_sd15, cache_interval=2, cache_branch=1, start_percent=10.0, end_percent=90.0,
                            unique_id="7")
    assert has_deepcache(patched) and not has_deepcache(tiny_sd15)
    assert patched.model_options["comfy_accel_applied"]["deepcache"] == {
        "cache_interval": 2, "cache_branch": 1, "start_percent": 10.0, "end_percent": 90.0}
    assert deepcache_state(patched).config.node_id == "7"


def _latent(server, entry, node):
    import safetensors.torch

    saved = entry["outputs"][node]["latents"][0]
    return safetensors.torch.load_file(str(Path(server.base) / "output" / saved["subfolder"] / saved["filename"]))


def _graph(model_node, prefix):
    return sampling_prompt("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, prefix, steps=4,
                           sampler_model=model_node)


def test_object_info_describes_both_nodes(comfy_server):
    info = comfy_server.get("/object_info")
    deepcache = info["AccelDeepCache"]
    assert deepcache["display_name"] == "DeepCache"
    assert set(deepcache["input"]["required"]) == {"model", "cache_interval", "cache_branch", "start_percent",
                                                   "end_percent"}
    assert info["AccelTinyVAE"]["display_name"] == "Tiny VAE"
    assert info["AccelTinyVAE"]["output"] == ["VAE"]


def test_freeu_deepcache_tiny_vae_workflow_over_http(comfy_server):
    """UNETLoader → FreeU_V2 → DeepCache → KSampler → VAEDecode(Tiny VAE) → SaveImage, plus the exactness of
    interval 1 against the same graph without DeepCache, all through the real server."""
    from tools.taesd_factory import write_taesd_files

    write_taesd_files(Path(comfy_server.base) / "models" / "vae_approx", "sd")
    plain = comfy_server.run_prompt(_graph(["2", 0], "accel_test/dc_plain"), timeout=300)
    assert plain["status"]["status_str"] == "success", plain["status"]

    exact = _graph(["7", 0], "accel_test/dc_interval1")
    exact["7"] = {"class_type": "AccelDeepCache", "inputs": {"model": ["2", 0], "cache_interval": 1,
                                                             "cache_branch": 0, "start_percent": 0.0,
                                                             "end_percent": 100.0}}
    entry = comfy_server.run_prompt(exact, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert torch.equal(_latent(comfy_server, entry, "6")["latent_tensor"],
                       _latent(comfy_server, plain, "6")["latent_tensor"])

    cached = _graph(["7", 0], "accel_test/dc_interval2")
    cached["7"] = {"class_type": "AccelDeepCache", "inputs": {"model": ["2", 0], "cache_interval": 2,
                                                              "cache_branch": 0, "start_percent": 0.0,
                                                              "end_percent": 100.0}}
    cached["8"] = {"class_type": "AccelTinyVAE", "inputs": {"vae_family": "auto", "model": ["1", 0]}}
    cached["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["8", 0]}}
    cached["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "accel_test/dc"}}
    entry = comfy_server.run_prompt(cached, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["10"]["images"][0]
    assert (Path(comfy_server.base) / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
    assert not torch.equal(_latent(comfy_server, entry, "6")["latent_tensor"],
                           _latent(comfy_server, plain, "6")["latent_tensor"])


def test_wrong_tiny_vae_family_fails_the_prompt_with_the_reason(comfy_server):
    from tools.taesd_factory import write_taesd_files

    write_taesd_files(Path(comfy_server.base) / "models" / "vae_approx", "sdxl")
    graph = {key: node for key, node in _graph(["2", 0], "unused").items() if key in ("1", "4")}
    graph["8"] = {"class_type": "AccelTinyVAE", "inputs": {"vae_family": "sdxl", "model": ["1", 0]}}
    graph["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["8", 0]}}
    graph["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "accel_test/x"}}
    entry = comfy_server.run_prompt(graph, timeout=300)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "does not match the connected MODEL" in errors[0]["exception_message"]


@pytest.mark.parametrize("value", [0, 101])
def test_out_of_range_interval_is_rejected_before_running(comfy_server, value):
    from tools.comfy_host import HostError

    graph = _graph(["7", 0], "accel_test/dc_bad")
    graph["7"] = {"class_type": "AccelDeepCache", "inputs": {"model": ["2", 0], "cache_interval": value,
                                                             "cache_branch": 0, "start_percent": 0.0,
                                                             "end_percent": 100.0}}
    with pytest.raises(HostError, match="cache_interval"):
        comfy_server.queue_prompt(graph)
