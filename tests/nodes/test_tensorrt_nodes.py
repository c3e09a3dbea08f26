"""The Build/Load TensorRT Engine nodes: in-process, and in a real ComfyUI server over HTTP (no TensorRT here)."""
import pytest


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
        BuildTensorRTEngine().build(build_model("tiny-flux"), "512x512 (SD1.5)", False)


def test_load_node_names_an_unknown_engine(pack, tiny_sd15):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.nodes.tensorrt import LoadTensorRTEngine

    with pytest.raises(AcceleratorInputError, match="'nope.engine' is neither in the cache nor in models/tensorrt"):
        LoadTensorRTEngine().load(tiny_sd15, "nope.engine")


def test_object_info_and_a_build_without_tensorrt_over_http(comfy_server):
    from comfy_accel.accelerators.tensorrt import available

    info = comfy_server.get("/object_info")
    build, load = info["AccelBuildTensorRTEngine"], info["AccelLoadTensorRTEngine"]
    assert build["display_name"] == "Build TensorRT Engine" and load["display_name"] == "Load TensorRT Engine"
    assert "512x512 (SD1.5)" in build["input"]["required"]["profile"][0]
    assert {"batch_min", "height_opt", "tokens_max", "static"} <= set(build["input"]["required"])
    assert build["output"] == ["MODEL", "STRING"] and load["output"] == ["MODEL"]
    if available():
        pytest.skip("TensorRT is available here: a real build is covered by the GPU tests")
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "accel_small_sd15.safetensors",
                                                      "weight_dtype": "default"}},
        "2": {"class_type": "AccelBuildTensorRTEngine", "inputs": {
            "model": ["1", 0], "profile": "512x512 (SD1.5)", "static": False, "batch_min": 1, "batch_opt": 2,
            "batch_max": 4, "height_min": 512, "height_opt": 512, "height_max": 512, "width_min": 512,
            "width_opt": 512, "width_max": 512, "tokens_min": 77, "tokens_opt": 77, "tokens_max": 154,
            "optimization_level": 3}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    entry = comfy_server.run_prompt(graph, timeout=120)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "AccelBuildTensorRTEngine"
    assert "Build TensorRT Engine: tensorrt not installed" in errors[0]["exception_message"]
