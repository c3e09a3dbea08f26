"""Node "Accelerate Model" in the real ComfyUI server: listed with its backends, a shared workflow naming a
backend this machine lacks still runs (eager, with the reason in the notices), `auto` on this CPU runs eager
and says why, an unknown backend name is refused by the host's validation with the allowed values."""
import pytest

from tests.nodes.prompts import sampling_prompt


def prompt_with(backend, prefix):
    return sampling_prompt("AccelAccelerateModel", {"backend": backend}, prefix)


def test_object_info_lists_accelerate_model_with_its_backends(comfy_server):
    node = comfy_server.get("/object_info")["AccelAccelerateModel"]
    assert node["display_name"] == "Accelerate Model"
    backends = node["input"]["required"]["backend"][0]
    assert backends[:2] == ["auto", "default"] and {"inductor", "inductor+cudagraphs", "onediff", "stable-fast",
                                                    "tensorrt", "eager"} <= set(backends)
    assert node["input"]["optional"]["fallback"][0] == ["default", "eager", "error"]


def test_a_workflow_naming_a_missing_backend_still_runs(pack, comfy_server):
    from comfy_accel.accelerators.tensorrt import available

    if available():
        pytest.skip("TensorRT is available here")
    entry = comfy_server.run_prompt(prompt_with("tensorrt", "accel_test/accelerate_trt"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["6"]["latents"]
    notices = comfy_server.get("/accel/notices")["notices"]
    assert any(n["node"] == "2" and available().reason in n["message"] and "running eager" in n["message"]
               for n in notices), notices[-5:]


def test_auto_on_a_machine_without_a_gpu_runs_eager_and_says_why(pack, comfy_server):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks what auto does on a machine without a GPU")
    entry = comfy_server.run_prompt(prompt_with("auto", "accel_test/accelerate_auto"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    notices = comfy_server.get("/accel/notices")["notices"]
    assert any(n["node"] == "2" and n["message"].startswith("auto picked eager: torch sees no CUDA GPU here")
               for n in notices), notices[-5:]
    assert not any(n["node"] == "2" and "compil" in n["message"] and "auto" not in n["message"] for n in notices)


def test_an_unknown_backend_is_refused_with_the_allowed_values(comfy_server):
    from tools.comfy_host import HostError

    with pytest.raises(HostError, match="backend") as err:
        comfy_server.queue_prompt(prompt_with("warp", "accel_test/bad_backend"))
    assert "warp" in str(err.value)
