"""The Step Cache node: in-process, and in a real ComfyUI server over HTTP (its UI output, the per-run line)."""
import torch

from tests.nodes.prompts import sampling_prompt
from tools.model_factory import sample

INPUTS = {"cache_mode": "interval", "threshold": 0.2, "interval": 2, "start": 0.0, "end": 1.0, "max_consecutive": 3}


def test_node_patches_a_clone_reports_what_it_attached_and_each_run(pack, tiny_sd15):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.step_cache import step_cache_state
    from comfy_accel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_DISPLAY_NAME_MAPPINGS["AccelStepCache"] == "Step Cache"
    result = NODE_CLASS_MAPPINGS["AccelStepCache"]().patch(tiny_sd15, **INPUTS, unique_id="41")
    (patched,) = result["result"]
    assert step_cache_state(tiny_sd15) is None and step_cache_state(patched).config.node_id == "41"
    shown = result["ui"]["comfy_accel"][0]
    assert shown["accelerator"] == "step_cache" and shown["fallback"] is None
    assert shown["note"].startswith("interval, interval 2")
    assert patched.model_options["comfy_accel_applied"]["step_cache"]["cache_mode"] == "interval"
    out = sample(patched, steps=4)
    assert not torch.equal(out, sample(tiny_sd15, steps=4))   # steps 1 and 3 reused step 0's and 2's prediction
    lines = [n for n in events.recent(20) if n.get("node") == "41"]
    assert lines[-1]["message"].startswith("skipped 2 of 4 steps (interval, interval 2")
    assert lines[-1]["level"] == "info" and lines[-1]["summary"] is True


def test_step_cache_over_http_shows_the_run_in_the_history(comfy_server):
    info = comfy_server.get("/object_info")["AccelStepCache"]
    assert info["display_name"] == "Step Cache"
    assert info["input"]["required"]["cache_mode"][0] == ["adaptive", "interval", "taylor"]
    entry = comfy_server.run_prompt(sampling_prompt("AccelStepCache", INPUTS, "accel_test/step_cache", steps=4),
                                    timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["2"]["comfy_accel"][0]["accelerator"] == "step_cache"
    record = entry["prompt"][3]["extra_pnginfo"]["comfy_accel"]
    assert record["in_effect"]["step_cache"]["used"] == "step_cache"
    assert any(n["node"] == "2" and n["message"].startswith("skipped 2 of 4 steps") for n in record["notices"]), \
        record["notices"]
