"""ONNX export of the real ComfyUI UNet (tiny SD1.5 and SDXL), run with onnxruntime against ComfyUI eager.

One export per model (module fixture), checked at two resolutions, two batch sizes and two prompt lengths:
shapes other than the traced one prove the axes are really dynamic.
"""
import pytest
import torch

from tools.model_factory import unet_inputs

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

SHAPES = [(1, 64, 64, 77), (2, 96, 128, 154)]   # (batch, height px, width px, tokens)


def _export(pack, patcher, folder):
    from comfy_accel.accelerators.tensorrt.export import export_onnx
    from comfy_accel.accelerators.tensorrt.profiles import static_profile

    return export_onnx(patcher.model.diffusion_model, folder, static_profile(2, 64, 64, 77))


@pytest.fixture(scope="module")
def sd15_export(pack, tiny_sd15, tmp_path_factory):
    return _export(pack, tiny_sd15, tmp_path_factory.mktemp("onnx-sd15"))


@pytest.fixture(scope="module")
def sdxl_export(pack, tiny_sdxl, tmp_path_factory):
    return _export(pack, tiny_sdxl, tmp_path_factory.mktemp("onnx-sdxl"))


def run_onnx(path_or_bytes, patcher, batch, height, width, tokens, seed=3):
    session = ort.InferenceSession(path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes),
                                   providers=["CPUExecutionProvider"])
    x, t, context, y = unet_inputs(patcher, batch=batch, height=height, width=width, tokens=tokens, seed=seed)
    feed = {"x": x.numpy(), "timesteps": t.numpy(), "context": context.numpy()}
    if y is not None:
        feed["y"] = y.numpy()
    out = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        eager = patcher.model.diffusion_model(x, t, context=context, y=y)
    return out, eager


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-{}x{}-t{}".format(*s))
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_onnx_matches_comfy_eager(request, which, shape):
    exported = request.getfixturevalue(f"{which}_export")
    patcher = request.getfixturevalue(f"tiny_{which}")
    out, eager = run_onnx(exported.path, patcher, *shape)
    assert out.shape == eager.shape == (shape[0], 4, shape[1] // 8, shape[2] // 8)
    assert eager.abs().mean() > 0.1  # a live UNet, so the comparison means something
    relative = ((out - eager).norm() / eager.norm()).item()
    assert relative < 1e-4, f"onnxruntime vs ComfyUI eager: relative error {relative:.2e}"


def test_inputs_are_named_and_ordered_as_the_loader_calls_them(sd15_export, sdxl_export):
    import onnx

    assert sd15_export.input_names == ("x", "timesteps", "context")
    assert sdxl_export.input_names == ("x", "timesteps", "context", "y")
    for exported in (sd15_export, sdxl_export):
        graph = onnx.load(str(exported.path)).graph
        assert [i.name for i in graph.input] == list(exported.input_names)  # weights are not graph inputs
        assert [o.name for o in graph.output] == ["out"]
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert dims["x"][0] == "batch" and dims["x"][2] == "height" and dims["x"][3] == "width"
        assert dims["context"][:2] == ["batch", "tokens"]


def test_every_weight_is_named_after_its_comfy_key(tiny_sd15, sd15_export):
    """The refit map covers the whole UNet, one engine weight per state-dict key, none merged."""
    keys = {"diffusion_model." + k for k in tiny_sd15.model.diffusion_model.state_dict()}
    refit_map = sd15_export.refit_map
    assert {e.key for e in refit_map.entries.values()} == keys
    assert len(refit_map) == len(keys)
    transforms = {e.transform for e in refit_map.entries.values()}
    assert (("transpose", (1, 0)),) in transforms     # Linear weights before MatMul
    assert (("unsqueeze", (1, 2)),) in transforms     # GroupNorm scale/bias
    # zero biases are equal tensors: the exporter must not have merged them into one (unrefittable) weight
    zero_biases = [k for k, v in tiny_sd15.model.diffusion_model.state_dict().items()
                   if k.endswith(".bias") and not v.any()]
    assert len(zero_biases) > 10 and all("diffusion_model." + k in refit_map.entries for k in zero_biases)


def test_export_leaves_the_comfy_model_untouched(pack, tiny_sd15, tmp_path):
    before = {k: v.clone() for k, v in tiny_sd15.model.diffusion_model.state_dict().items()}
    _export(pack, tiny_sd15, tmp_path)
    after = tiny_sd15.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_sd15.model.diffusion_model.training is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]   # no raw export left behind
