"""Node "Accelerate Model" in the real ComfyUI server: listed with its backends, a shared workflow naming a
backend this machine lacks still runs (eager, with the reason in the image metadata), an unknown backend name
is refused by the host's validation with the allowed values."""
import pytest


def prompt_with(backend, prefix):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "accel_small_sd15.safetensors",
                                                      "weight_dtype": "default"}},
        "2": {"class_type": "AccelAccelerateModel", "inputs": {"model": ["1", 0], "backend": backend}},
        "3": {"class_type": "AccelTestConditioning", "inputs": {"seed": 1, "family": "sd15", "tokens": 77}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 3, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["3", 1],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }


def test_object_info_lists_accelerate_model_with_its_backends(comfy_server):
    node = comfy_server.get("/object_info")["AccelAccelerateModel"]
    assert node["display_name"] == "Accelerate Model"
    backends = node["input"]["required"]["backend"][0]
    assert backends[:2] == ["auto", "default"] and {"inductor", "inductor+cudagraphs", "onediff", "stable-fast",
                                                    "tensorrt", "eager"} <= set(backends)
    assert node["input"]["optional"]["fallback"][0] == ["default", "eager", "error"]


def test_a_workflow_naming_a_missing_backend_still_runs(comfy_server):
    from comfy_accel.accelerators.tensorrt import available

    if available():
        pytest.skip("TensorRT is available here")
    entry = comfy_server.run_prompt(prompt_with("tensorrt", "accel_test/accelerate_trt"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["6"]["latents"]


def test_an_unknown_backend_is_refused_with_the_allowed_values(comfy_server):
    from tools.comfy_host import HostError

    with pytest.raises(HostError, match="backend") as err:
        comfy_server.queue_prompt(prompt_with("warp", "accel_test/bad_backend"))
    assert "warp" in str(err.value)
