"""The Build/Load TensorRT Engine nodes: in-process, and in a real ComfyUI server over HTTP (no TensorRT here)."""
import json
from pathlib import Path

import pytest

from tests.nodes.prompts import sampling_prompt


def test_nodes_are_registered_with_their_names(pack):
    from comfy_accel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from comfy_accel.nodes.common import CATEGORY

    for key, title in (("AccelBuildTensorRTEngine", "Build TensorRT Engine"),
                       ("AccelLoadTensorRTEngine", "Load TensorRT Engine")):
        assert NODE_DISPLAY_NAME_MAPPINGS[key] == title
        assert NODE_CLASS_MAPPINGS[key].CATEGORY == CATEGORY


def test_build_node_profiles_from_presets_and_explicit_ranges(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.nodes.tensorrt import CUSTOM, BuildTensorRTEngine

    ranges = dict(batch_min=1, batch_opt=2, batch_max=4, height_min=512, height_opt=768, height_max=1024,
                  width_min=512, width_opt=512, width_max=768, tokens_min=77, tokens_opt=77, tokens_max=154)
    assert [p.batch.max for p in BuildTensorRTEngine.profiles("1024x1024 (SDXL)", False, **ranges)] == [1, 4]
    (dynamic,) = BuildTensorRTEngine.profiles(CUSTOM, False, **ranges)
    assert dynamic.height.as_list() == [512, 768, 1024] and dynamic.tokens.as_list() == [77, 77, 154]
    (static,) = BuildTensorRTEngine.profiles(CUSTOM, True, **ranges)
    assert static.describe() == "batch 2, 512×768 px, 77 tokens"
    with pytest.raises(AcceleratorInputError, match="width needs min <= opt <= max, got min 512, opt 900, max 768"):
        BuildTensorRTEngine.profiles(CUSTOM, False, **{**ranges, "width_opt": 900})


def test_build_node_refuses_a_non_unet_model_before_any_work(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.nodes.tensorrt import BuildTensorRTEngine
    from tools.model_factory import build_model

    with pytest.raises(AcceleratorInputError, match="SD1.x/SD2.x/SDXL UNet models; this MODEL is Flux"):
        BuildTensorRTEngine().build(build_model("tiny-flux"), "512x512 (SD1.5)", False, fallback="error")


def test_build_node_runs_a_non_unet_model_eager_under_the_default_policy(pack):
    from comfy_accel.nodes.tensorrt import BuildTensorRTEngine
    from tools.model_factory import build_model

    flux = build_model("tiny-flux")
    result = BuildTensorRTEngine().build(flux, "512x512 (SD1.5)", False, unique_id="71")
    (out, engine_id), (shown,) = result["result"], result["ui"]["comfy_accel"]
    assert out is not flux and not out.wrappers.get("apply_model") and engine_id == ""
    assert shown["attached"] == "eager" and "this MODEL is Flux" in shown["fallback"], shown


def test_load_node_names_an_unknown_engine_under_error(pack, tiny_sd15):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.nodes.tensorrt import LoadTensorRTEngine

    with pytest.raises(AcceleratorInputError, match="'nope.engine' is neither in the cache nor in models/tensorrt"):
        LoadTensorRTEngine().load(tiny_sd15, "nope.engine", fallback="error")


def test_object_info_lists_both_nodes_with_a_fallback_input(comfy_server):
    info = comfy_server.get("/object_info")
    build, load = info["AccelBuildTensorRTEngine"], info["AccelLoadTensorRTEngine"]
    assert build["display_name"] == "Build TensorRT Engine" and load["display_name"] == "Load TensorRT Engine"
    assert "512x512 (SD1.5)" in build["input"]["required"]["profile"][0]
    assert {"batch_min", "height_opt", "tokens_max", "static"} <= set(build["input"]["required"])
    assert build["output"] == ["MODEL", "STRING"] and load["output"] == ["MODEL"]
    accelerate = info["AccelAccelerateModel"]["input"]["optional"]["fallback"][0]
    # optional on Build: workflows saved before it existed still validate (and run eager)
    for choices in (build["input"]["optional"]["fallback"], load["input"]["required"]["fallback"]):
        assert choices[0] == accelerate and choices[1]["default"] == "eager"


BUILD_INPUTS = {"profile": "512x512 (SD1.5)", "static": False, "batch_min": 1, "batch_opt": 2, "batch_max": 4,
                "height_min": 512, "height_opt": 512, "height_max": 512, "width_min": 512, "width_opt": 512,
                "width_max": 512, "tokens_min": 77, "tokens_opt": 77, "tokens_max": 154, "optimization_level": 3}
# how a workflow saved on a machine with engines names one (Load's list there): unknown here
FOREIGN_ENGINE = "cache:0123456789ab sd15 NVIDIA H100 80GB HBM3 batch 1-4, 512×512 px, 77-154 tokens"


def tensorrt_reason(server) -> str:
    row = next(r for r in server.get("/accel/status")["accelerators"] if r["name"] == "tensorrt")
    if row["available"]:
        pytest.skip("TensorRT is available here: a real build is covered by the GPU tests")
    return row["reason"]


def engine_workflow(node_class: str, inputs: dict, prefix: str) -> dict:
    """UNETLoader → the TensorRT node → KSampler → SaveLatent (whose file carries the "comfy_accel" record)."""
    return sampling_prompt(node_class, inputs, prefix)


def saved_record(server, entry) -> dict:
    from safetensors import safe_open

    saved = entry["outputs"]["6"]["latents"][0]
    with safe_open(str(Path(server.base) / "output" / saved["subfolder"] / saved["filename"]), "pt") as latent:
        return json.loads(latent.metadata()["comfy_accel"])


def errors_of(entry) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


@pytest.mark.parametrize("node_class, inputs, reason", [
    ("AccelBuildTensorRTEngine", BUILD_INPUTS, None),   # no fallback input: a workflow saved before it existed
    ("AccelLoadTensorRTEngine", {"engine": "(no engines yet)", "fallback": "eager"}, "'(no engines yet)' is neither"),
    ("AccelLoadTensorRTEngine", {"engine": FOREIGN_ENGINE, "fallback": "default"}, "is neither in the cache nor"),
], ids=["build", "load-none", "load-foreign"])
def test_a_workflow_with_a_tensorrt_node_runs_eager_with_the_reason_here(comfy_server, node_class, inputs, reason):
    missing = tensorrt_reason(comfy_server)
    reason = reason or missing
    entry = comfy_server.run_prompt(engine_workflow(node_class, inputs, f"accel_test/{node_class}"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    effect = saved_record(comfy_server, entry)["in_effect"]["tensorrt"]
    assert effect["node"] == "2" and effect["used"].startswith("eager (fallback: ") and reason in effect["fallback"]
    (shown,) = entry["outputs"]["2"]["comfy_accel"]
    assert shown["attached"] == "eager" and reason in shown["fallback"], shown


@pytest.mark.parametrize("node_class, inputs, message", [
    ("AccelBuildTensorRTEngine", {**BUILD_INPUTS, "fallback": "error"}, "Build TensorRT Engine: tensorrt not installed"),
    ("AccelLoadTensorRTEngine", {"engine": "(no engines yet)", "fallback": "error"},
     "TensorRT engine '(no engines yet)' is neither in the cache nor in models/tensorrt (build one with Build "
     "TensorRT Engine, or put an engine file in models/tensorrt)"),
], ids=["build", "load"])
def test_a_workflow_with_a_tensorrt_node_fails_with_the_reason_under_error(comfy_server, node_class, inputs, message):
    tensorrt_reason(comfy_server)
    entry = comfy_server.run_prompt(engine_workflow(node_class, inputs, "accel_test/trt_error"), timeout=300)
    assert entry["status"]["status_str"] == "error"
    (error,) = errors_of(entry)
    assert error["node_type"] == node_class and message in error["exception_message"], error
