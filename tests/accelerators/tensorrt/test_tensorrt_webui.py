"""TensorRT on the WebUI's UNet, up to the engine build (tensorrt needs a GPU), against a real A1111 checkout.

Gated on WEBUI_PATH (an A1111 checkout with its repositories and venv; not on any package registry): the WebUI's
own `ldm` UNet, built from the harness checkpoint in the WebUI's venv (torch 2.1), is exported through the pack's
WebUI export (tests/scripts/webui_unet_export.py); here onnxruntime runs that ONNX, and the real ComfyUI loads the
same checkpoint file. Checked: the ONNX computes the WebUI's UNet at a shape other than the traced one, its weights
carry the checkpoint's key names, ComfyUI's UNet computes the same function, and the engine key the WebUI side
computes is the one ComfyUI computes: a shared COMFY_ACCEL_CACHE gives an engine built by either host to the other.
"""
import json
import subprocess
from pathlib import Path

import numpy
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]   # not from tests.conftest: ComfyUI has a `tests` package too
from tools.webui_host import WebUIHost, webui_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(webui_path() is None, reason="WEBUI_PATH is not set: these tests need an "
                                 "AUTOMATIC1111 checkout with its repositories and venv (docs/webui.md)")]
DATA = REPO_ROOT / "test_artifacts" / "webui"


@pytest.fixture(scope="module")
def webui_export(tmp_path_factory):
    pytest.importorskip("onnx", reason="the ONNX checks need the onnx package")
    host = WebUIHost(webui_path(), DATA)
    checkpoint = host.checkpoint()
    out = tmp_path_factory.mktemp("webui_export")
    done = subprocess.run([str(host.python), str(REPO_ROOT / "tests" / "scripts" / "webui_unet_export.py"),
                           str(checkpoint), str(out)], cwd=host.root, capture_output=True, text=True, timeout=600)
    if done.returncode:
        pytest.fail(f"the export in the WebUI's venv failed:\n{done.stderr[-3000:]}")
    return checkpoint, out, json.loads((out / "result.json").read_text())


def test_the_webui_unet_exports_with_the_checkpoint_names_and_runs(webui_export):
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX needs onnxruntime")
    import onnx

    _, out, result = webui_export
    model = onnx.load(str(out / "unet.onnx"))
    weights = {init.name for init in model.graph.initializer if init.name.startswith("diffusion_model.")}
    assert weights == set(result["state_keys"])   # every UNet weight, under its checkpoint key: refittable by name
    assert [i.name for i in model.graph.input] == ["x", "timesteps", "context"]
    io = numpy.load(out / "io.npz")
    session = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: io[n] for n in ("x", "timesteps", "context")})[0]
    assert got.shape == io["out"].shape == (1, 4, 12, 16)   # batch 1, 96×128 px, 154 tokens: not the traced shape
    assert numpy.abs(io["out"]).max() > 0
    assert numpy.allclose(got, io["out"], atol=1e-4, rtol=1e-3)


def _comfy_patcher(checkpoint):
    """The checkpoint loaded by the real ComfyUI: its state-dict detection, with the heads of the checkpoint's yaml
    (ComfyUI detects a full-size SD1.5 by its shapes; this tiny UNet's heads are only in its config file)."""
    import yaml

    from tools.comfy_host import import_comfy

    import_comfy()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    prefix = "model.diffusion_model."
    state = comfy.utils.load_torch_file(str(checkpoint))
    unet_config = comfy.model_detection.detect_unet_config(state, prefix)
    params = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]["params"]

    class CheckpointHeads(comfy.supported_models.SD15):
        unet_extra_config = {"num_heads": params.get("num_heads", -1),
                             "num_head_channels": params.get("num_head_channels", -1)}

    config = CheckpointHeads(unet_config)
    model = config.get_model(state, prefix)
    model.load_model_weights(state, prefix)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def test_comfyui_computes_the_same_engine_key_and_function(webui_export):
    import torch

    from accelerators.tensorrt.engine import BuildSettings
    from accelerators.tensorrt.profiles import profile_from_dict
    from accelerators.tensorrt.store import comfy_engine_key
    from tests.scripts.webui_unet_export import TENSORRT_VERSION

    checkpoint, out, result = webui_export
    patcher = _comfy_patcher(checkpoint)
    key = comfy_engine_key(patcher, [profile_from_dict(result["profile"])], BuildSettings(),
                           tensorrt_version=TENSORRT_VERSION, device="cpu")
    assert key.fields == result["key_fields"] and key.id == result["key_id"]
    assert "host" not in key.fields["versions"] and "torch" not in key.fields["versions"]
    io = numpy.load(out / "io.npz")
    with torch.no_grad():
        comfy_out = patcher.model.diffusion_model(torch.from_numpy(io["x"]), torch.from_numpy(io["timesteps"]),
                                                  context=torch.from_numpy(io["context"]))
    assert numpy.allclose(comfy_out.numpy(), io["out"], atol=1e-4, rtol=1e-3)   # one function on both hosts


def test_the_webui_runner_serves_its_engine_and_falls_back_with_the_reason(webui_export):
    """WebUITensorRTRunner with the engine runtime replaced by onnxruntime on the WebUI's export (the test double of
    test_tensorrt_loader.py), on the same checkpoint's UNet as ComfyUI loads it: in-profile calls run the engine,
    others the host's eager UNet with the reason in the job's notes, or fail under the `error` policy."""
    import torch

    from accelerators.base import Availability, BackendUnavailable
    from accelerators.tensorrt.loader import EngineRecord, TensorRTOptions
    from accelerators.tensorrt.profiles import profile_from_dict
    from accelerators.tensorrt.refit import RefitMap
    from accelerators.tensorrt.webui import WebUITensorRTRunner, WebUITensorRTSession
    from tests.accelerators.tensorrt.test_tensorrt_loader import OnnxRuntimeEngine

    checkpoint, out, result = webui_export
    unet = _comfy_patcher(checkpoint).model.diffusion_model

    def host_forward(module, x, timesteps, context, *args, **kwargs):
        return module(x, timesteps, context=context)

    plan, refit_map = (out / "unet.onnx").read_bytes(), RefitMap.from_json((out / "refit_map.json").read_text())
    engines = WebUITensorRTSession(TensorRTOptions(build_on_demand=False), host_forward, "sd1",
                                   engine_loader=OnnxRuntimeEngine,
                                   check_available=lambda: Availability(True, "onnxruntime stand-in"))
    engines.records.append(EngineRecord(source="webui-export", profiles=[profile_from_dict(result["profile"])],
                                        refit_map=refit_map, load_plan=lambda: plan))
    runner = WebUITensorRTRunner(unet, host_forward, engines)
    io = {k: torch.from_numpy(v) for k, v in numpy.load(out / "io.npz").items()}
    with torch.no_grad():
        served = runner(io["x"], io["timesteps"], io["context"])
        assert numpy.allclose(served.numpy(), io["out"].numpy(), atol=1e-4, rtol=1e-3)
        assert runner.counts.compiled == 1 and runner.counts.eager == 0 and not runner.notes
        large = torch.randn(1, 4, 32, 32)   # 256 px: outside the engine's 64..128
        eager = runner(large, io["timesteps"], io["context"])
        assert torch.equal(eager, host_forward(unet, large, io["timesteps"], io["context"]))
    assert runner.counts.eager == 1 and "no engine profile covers batch 1, 256×256 px" in runner.notes[0]
    engines.options.fallback = "error"
    with pytest.raises(BackendUnavailable, match="no engine profile covers"), torch.no_grad():
        runner(large, io["timesteps"], io["context"])
