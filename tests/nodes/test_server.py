"""The pack inside a real ComfyUI server: registered nodes, status route, and a workflow over HTTP."""
from pathlib import Path

import pytest

from tests.nodes.prompts import sampling_prompt


def test_object_info_lists_the_pack_nodes(comfy_server):
    info = comfy_server.get("/object_info")
    assert "AccelCFGCutoff" in info
    node = info["AccelCFGCutoff"]
    assert node["display_name"] == "CFG Cutoff"
    assert node["python_module"].endswith("comfy_accel")
    assert node["input"]["required"]["cutoff_percent"][1]["max"] == 100.0


def test_status_route_lists_accelerators_with_reasons(pack, comfy_server):
    from comfy_accel.accelerators import options

    status = comfy_server.get("/accel/status")
    assert status["options"] == options.describe()   # what web/accel.js builds its settings from
    names = {row["name"]: row for row in status["accelerators"]}
    assert names["cfg_cutoff"]["available"] is True
    for row in status["accelerators"]:
        assert isinstance(row["reason"], str) and row["reason"], row
    # the same route answers under /api, where the frontend calls it
    assert comfy_server.get("/api/accel/status")["accelerators"]


def test_unet_loader_cfg_cutoff_ksampler_workflow(comfy_server):
    prompt = sampling_prompt("AccelCFGCutoff", {"cutoff_percent": 50.0}, "accel_test/cutoff", steps=4)
    entry = comfy_server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["6"]["latents"][0]
    path = Path(comfy_server.base) / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and path.stat().st_size > 0


def test_out_of_range_cutoff_is_rejected_with_a_clear_message(comfy_server):
    from tools.comfy_host import HostError

    prompt = sampling_prompt("AccelCFGCutoff", {"cutoff_percent": 150.0}, "accel_test/bad", steps=2)
    with pytest.raises(HostError, match="cutoff_percent"):
        comfy_server.queue_prompt(prompt)
