"""Run with the WebUI's Python from its checkout (the test test_tensorrt_webui.py does): the WebUI's UNet → ONNX.

    cd $WEBUI_PATH && venv/bin/python <repo>/tests/scripts/webui_unet_export.py <checkpoint.safetensors> <out dir>

Builds the checkpoint's UNet with the WebUI's own `ldm` classes from its `.yaml` (as A1111 does), exports it through
the pack's WebUI export (accelerators/tensorrt/webui.py: the same input and initializer names as ComfyUI's) on the
WebUI's torch, runs the UNet at a shape other than the export's, and writes `unet.onnx`, `refit_map.json`, `io.npz`
(inputs and the UNet's output) and `result.json` (the engine key the WebUI side computes, its parameter names).
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path.cwd() / "repositories" / "stable-diffusion-stability-ai")]

TENSORRT_VERSION = "10.0-key-test"   # tensorrt is not installed here: the key's TensorRT field is given


def main(checkpoint: Path, out: Path) -> None:
    import numpy
    import torch
    import yaml
    from safetensors.torch import load_file

    from accelerators.tensorrt.engine import BuildSettings
    from accelerators.tensorrt.export import export_onnx, sample_inputs, signature_of_unet
    from accelerators.tensorrt.profiles import make_profile
    from accelerators.tensorrt.webui import export_wrapper_class, webui_engine_key
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.util import instantiate_from_config

    config = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text())
    unet = instantiate_from_config(config["model"]["params"]["unet_config"]).eval()
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v for k, v in load_file(str(checkpoint)).items() if k.startswith(prefix)}
    unet.load_state_dict(state, strict=True)
    profile = make_profile((1, 2, 2), (64, 64, 128), (64, 64, 128), (77, 77, 154))
    out.mkdir(parents=True, exist_ok=True)
    wrapper = export_wrapper_class()(unet, UNetModel.forward, takes_y=False)
    exported = export_onnx(unet, out, profile, family="sd1", wrapper=wrapper)
    (out / "refit_map.json").write_text(exported.refit_map.to_json())
    signature = signature_of_unet(unet)
    x, t, context = sample_inputs(signature, 1, 96, 128, 154, "cpu", torch.float32, seed=3)   # not the opt shape
    with torch.no_grad():
        expected = unet(x, t, context)
    numpy.savez(out / "io.npz", x=x.numpy(), timesteps=t.numpy(), context=context.numpy(), out=expected.numpy())
    key = webui_engine_key(unet, [profile], BuildSettings(), "sd1", tensorrt_version=TENSORRT_VERSION,
                           device="cpu")
    result = {"key_id": key.id, "key_fields": key.fields, "torch": torch.__version__,
              "state_keys": sorted("diffusion_model." + k for k in unet.state_dict()),
              "profile": profile.as_dict()}
    (out / "result.json").write_text(json.dumps(result))
    print(json.dumps({"key_id": key.id, "torch": torch.__version__}))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
