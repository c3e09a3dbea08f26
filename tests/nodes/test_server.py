"""The pack inside a real ComfyUI server: registered nodes, status route, and a workflow over HTTP."""
from pathlib import Path

import pytest


def test_object_info_lists_the_pack_nodes(comfy_server):
    info = comfy_server.get("/object_info")
    assert "AccelCFGCutoff" in info
    node = info["AccelCFGCutoff"]
    assert node["display_name"] == "CFG Cutoff"
    assert node["python_module"].endswith("comfy_accel")
    assert node["input"]["required"]["cutoff_percent"][1]["max"] == 100.0


def test_status_route_lists_accelerators_with_reasons(comfy_server):
    status = comfy_server.get("/accel/status")
    names = {row["name"]: row for row in status["accelerators"]}
    assert names["cfg_cutoff"]["available"] is True
    for row in status["accelerators"]:
        assert isinstance(row["reason"], str) and row["reason"], row
    # the same route answers under /api, where the frontend calls it
    assert comfy_server.get("/api/accel/status")["accelerators"]


def test_unet_loader_cfg_cutoff_ksampler_workflow(comfy_server):
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "accel_small_sd15.safetensors",
                                                      "weight_dtype": "default"}},
        "2": {"class_type": "AccelCFGCutoff", "inputs": {"model": ["1", 0], "cutoff_percent": 50.0}},
        "3": {"class_type": "AccelTestConditioning", "inputs": {"seed": 1, "family": "sd15", "tokens": 77}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 3, "steps": 4, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "accel_test/cutoff"}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["6"]["latents"][0]
    path = Path(comfy_server.base) / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and path.stat().st_size > 0


def test_out_of_range_cutoff_is_rejected_with_a_clear_message(comfy_server):
    from tools.comfy_host import HostError

    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "accel_small_sd15.safetensors",
                                                      "weight_dtype": "default"}},
        "2": {"class_type": "AccelCFGCutoff", "inputs": {"model": ["1", 0], "cutoff_percent": 150.0}},
        "3": {"class_type": "AccelTestConditioning", "inputs": {"seed": 1, "family": "sd15", "tokens": 77}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 3, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "accel_test/bad"}},
    }
    with pytest.raises(HostError, match="cutoff_percent"):
        comfy_server.queue_prompt(prompt)
