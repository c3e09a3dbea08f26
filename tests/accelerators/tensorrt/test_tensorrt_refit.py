"""LoRA by refit, proven without TensorRT: the refit map names exactly the weights a real ComfyUI LoRA changes,
and the values computed for them, written into the exported ONNX, make onnxruntime give ComfyUI's own
LoRA'd eager result; removing the LoRA restores exactly those weights to base.
"""
import pytest
import torch

from tests.lora import BIAS_DIFF, TARGETS, make_lora, with_lora
from tools.model_factory import build_model, unet_inputs

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

@pytest.fixture(scope="module")
def model(pack):
    return build_model("tiny-sd15", seed=3)  # its own model: these tests patch weights in place


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    from comfy_accel.accelerators.tensorrt.export import export_onnx
    from comfy_accel.accelerators.tensorrt.profiles import static_profile

    return export_onnx(model.model.diffusion_model, tmp_path_factory.mktemp("refit"), static_profile(1, 64, 64, 77))


def eager_of(patcher, inputs):
    """ComfyUI's own result: the patcher loaded (LoRA merged into the weights by ComfyUI), then unpatched."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    try:
        x, t, context, y = inputs
        with torch.no_grad():
            return patcher.model.diffusion_model(x, t, context=context, y=y).clone()
    finally:
        comfy.model_management.unload_all_models()


def onnx_with(exported, values, inputs):
    """onnxruntime on the exported graph whose weights `values` ({engine name: tensor}) were replaced."""
    import onnx

    from comfy_accel.accelerators.tensorrt.export import write_engine_weights

    graph = onnx.load(str(exported.path))
    write_engine_weights(graph, values)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x, t, context, _ = inputs
    return torch.from_numpy(session.run(None, {"x": x.numpy(), "timesteps": t.numpy(), "context": context.numpy()})[0])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_refit_map_names_exactly_the_weights_a_lora_changes(model, exported):
    from comfy_accel.accelerators.tensorrt.refit import refit_names

    lora = with_lora(model, make_lora(model, TARGETS))
    expected = set(TARGETS.values()) | {BIAS_DIFF[1]}
    assert refit_names(exported.refit_map, lora) == expected
    assert refit_names(exported.refit_map, model) == set()
    partial = with_lora(model, make_lora(model, list(TARGETS)[:1], with_bias=False))
    assert refit_names(exported.refit_map, partial) == {next(iter(TARGETS.values()))}
    # the Linear weight is refitted transposed (as the engine holds it), the convs as they are
    assert exported.refit_map.entries[next(iter(TARGETS.values()))].transform == (("transpose", (1, 0)),)
    assert exported.refit_map.entries[TARGETS["lora_unet_input_blocks_1_1_proj_in"]].transform == ()


def test_refit_values_reproduce_comfy_lora_eager(model, exported):
    from comfy_accel.accelerators.tensorrt.refit import live_weights, refit_names

    inputs = unet_inputs(model, batch=1, seed=11)
    lora = with_lora(model, make_lora(model, TARGETS), strength=0.8)
    names = refit_names(exported.refit_map, lora)
    values = live_weights(lora, names, exported.refit_map, dtype=torch.float32)
    assert set(values) == names
    lora_eager = eager_of(lora, inputs)
    base_eager = eager_of(model, inputs)
    refitted = onnx_with(exported, values, inputs)
    assert rel(lora_eager, base_eager) > 1e-2            # the LoRA really changes the output
    assert rel(refitted, lora_eager) < 1e-4              # and the refit values reproduce ComfyUI's result
    assert rel(onnx_with(exported, {}, inputs), base_eager) < 1e-4


def test_removing_the_lora_restores_exactly_its_weights(model, exported):
    from comfy_accel.accelerators.tensorrt.refit import RefitState, desired_state, live_weights

    inputs = unet_inputs(model, batch=1, seed=12)
    state = RefitState()
    lora = with_lora(model, make_lora(model, TARGETS))
    changed, restore = state.plan(desired_state(exported.refit_map, lora))
    assert changed == set(TARGETS.values()) | {BIAS_DIFF[1]} and restore == set()
    engine_values = live_weights(lora, changed, exported.refit_map)
    state.commit(desired_state(exported.refit_map, lora))
    assert state.plan(desired_state(exported.refit_map, lora)) == (set(), set())   # same LoRA: no refit

    stronger = with_lora(model, make_lora(model, TARGETS), strength=0.5)           # another LoRA/strength
    assert state.plan(desired_state(exported.refit_map, stronger))[0] == changed

    changed, restore = state.plan(desired_state(exported.refit_map, model))        # LoRA removed
    assert changed == set() and restore == set(engine_values)
    engine_values.update(live_weights(model, restore, exported.refit_map))
    base = model.model.diffusion_model.state_dict()
    for name in restore:
        original = base[name.removeprefix("diffusion_model.")]
        expected = original.t() if original.ndim == 2 else original
        assert torch.equal(engine_values[name], expected)
    assert rel(onnx_with(exported, engine_values, inputs), eager_of(model, inputs)) < 1e-4


def test_export_of_a_model_patched_in_place_keeps_the_base_weights(model, tmp_path):
    """ComfyUI leaves a LoRA merged into the shared weights after sampling; the engine must still hold base."""
    import comfy.model_management

    from comfy_accel.accelerators.tensorrt.export import export_onnx
    from comfy_accel.accelerators.tensorrt.loader import base_state
    from comfy_accel.accelerators.tensorrt.profiles import static_profile

    inputs = unet_inputs(model, batch=1, seed=13)
    base_eager = eager_of(model, inputs)
    lora = with_lora(model, make_lora(model, TARGETS))
    comfy.model_management.load_models_gpu([lora])
    try:
        assert set(lora.backup) >= set(TARGETS.values())      # merged in place right now
        base = base_state(lora)
        result = export_onnx(model.model.diffusion_model, tmp_path, static_profile(1, 64, 64, 77),
                             base_weights={k: base[k] for k in lora.backup})
    finally:
        comfy.model_management.unload_all_models()
    x, t, context, _ = inputs
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"x": x.numpy(), "timesteps": t.numpy(), "context": context.numpy()})[0])
    assert rel(out, base_eager) < 1e-4
