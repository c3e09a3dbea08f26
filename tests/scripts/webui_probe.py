"""A test-only WebUI script (installed by tools/webui_host.py as its own extension, never shipped): records what
the UNet did in each job, independently of comfy-accel's own report.

- every denoiser call: the UNet batch (2 = cond + uncond, 1 = uncond skipped), from a forward pre-hook on the
  WebUI's `DiffusionWrapper` (`shared.sd_model.model`), which runs whatever SdUnet is selected;
- with `deep_hook` on (POST /accel-probe/config), whether the middle block ran during that call (a forward hook
  on `diffusion_model.middle_block`): DeepCache's cached calls must not run it. Off by default, since a hook
  inside a compiled UNet would change what is compiled.

GET /accel-probe/jobs → [{"calls": [{"batch": 2, "deep": true|null, "t": 999.0}, ...]}, ...] (t: the call's timestep);
POST /accel-probe/reset.
POST /accel-probe/tensorrt-export: the pack's TensorRT export of the loaded UNet in this process (see the route).
POST /accel-probe/paste {"infotext": ...}: what the WebUI's own paste gives comfy-accel's accordion (its
`infotext_fields`, fed the WebUI's own parse of the text), as {component label: value}.
"""
from modules import script_callbacks, scripts

JOBS: list[dict] = []
CONFIG = {"deep_hook": False}
_handles: dict = {}


def _install(sd_model) -> None:
    for handle in _handles.values():
        handle.remove()
    _handles.clear()
    wrapper = sd_model.model

    def before_unet(_module, args, kwargs=None):
        x = args[0] if args else (kwargs or {}).get("x")
        t = args[1] if len(args) > 1 else (kwargs or {}).get("t")
        if JOBS:
            JOBS[-1]["calls"].append({"batch": int(x.shape[0]), "deep": False if CONFIG["deep_hook"] else None,
                                      "t": float(t.max()) if t is not None else None})

    _handles["unet"] = wrapper.register_forward_pre_hook(before_unet)
    _middle_hook(sd_model)


def _middle_hook(sd_model) -> None:
    """The middle block's hook, only while `deep_hook` is on: inside the UNet it would be compiled with it, and
    torch ≥ 2.5's dynamo imports a hook's module by name, which A1111's scripts never are ('No module named
    accel_probe': the compile fails and the UNet runs eager)."""
    def after_middle(_module, _args, _output):
        if JOBS and JOBS[-1]["calls"]:
            JOBS[-1]["calls"][-1]["deep"] = True

    handle = _handles.pop("middle", None)
    if handle is not None:
        handle.remove()
    if CONFIG["deep_hook"]:
        _handles["middle"] = sd_model.model.diffusion_model.middle_block.register_forward_hook(after_middle)


class AccelProbe(scripts.Script):
    def title(self):
        return "accel-probe"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        JOBS.append({"calls": []})


def _routes(_demo, app):
    @app.get("/accel-probe/jobs")
    def jobs():
        return JOBS

    @app.post("/accel-probe/reset")
    def reset():
        JOBS.clear()
        return {"ok": True}

    @app.post("/accel-probe/paste")
    def paste(body: dict):
        from modules import infotext_utils

        params = infotext_utils.parse_generation_parameters(body["infotext"])
        script = next(s for s in scripts.scripts_txt2img.alwayson_scripts if s.title() == "comfy-accel")
        values = {}
        for component, read in script.infotext_fields:
            value = read(params)
            values[component.label] = value if not isinstance(value, dict) else None   # gr.update(): unchanged
        return values

    @app.post("/accel-probe/tensorrt-export")
    def tensorrt_export(body: dict):
        """The pack's TensorRT export of the loaded UNet inside the running WebUI (its hijacks, its attention switch,
        A1111's LoRA state as the last job left it), up to the engine build: writes `unet.onnx` and `io.npz` (inputs
        and the live UNet's output) to body["out"]; returns the engine key and the LoRA state seen."""
        from pathlib import Path

        import numpy
        import torch
        from modules import sd_hijack, shared

        from accelerators.tensorrt.engine import BuildSettings
        from accelerators.tensorrt.export import export_onnx, sample_inputs, signature_of_unet
        from accelerators.tensorrt.profiles import profile_from_dict
        from accelerators.tensorrt.webui import (WebUIWeights, a1111_exportable_attention, export_wrapper_class,
                                                 webui_engine_key)

        unet, forward = shared.sd_model.model.diffusion_model, sd_hijack.ldm_original_forward
        profile, out = profile_from_dict(body["profile"]), Path(body["out"])
        weights, attention_before = WebUIWeights(unet), sd_hijack.model_hijack.optimization_method
        with torch.no_grad():
            with a1111_exportable_attention():
                exported = export_onnx(unet, out, profile, family="sd1", base_weights=weights.in_place_base(),
                                       wrapper=export_wrapper_class()(unet, forward, False))
            x, t, context = sample_inputs(signature_of_unet(unet), 1, 96, 128, 154, "cpu", torch.float32, seed=3)
            live = forward(unet, x, t, context)
        numpy.savez(out / "io.npz", x=x.numpy(), timesteps=t.numpy(), context=context.numpy(), out=live.numpy())
        key = webui_engine_key(unet, [profile], BuildSettings(), "sd1", tensorrt_version=body["tensorrt_version"],
                               device="cpu")
        refitted = _refit_into_onnx(exported, profile, weights, forward, out / "refitted.onnx")
        return {"key_id": key.id, "in_place": sorted(weights.in_place_base()), "refitted": refitted,
                "lora_weights": len(weights.desired_state(exported.refit_map)),
                "attention": [attention_before, sd_hijack.model_hijack.optimization_method]}

    @app.post("/accel-probe/config")
    def config(values: dict):
        from modules import shared

        CONFIG.update({k: bool(v) for k, v in values.items() if k in CONFIG})
        _middle_hook(shared.sd_model)
        return CONFIG


def _refit_into_onnx(exported, profile, weights, forward, path) -> int:
    """WebUITensorRTSession.sync_weights on an engine stand-in whose refit writes the named weights into the ONNX
    (what the TensorRT refitter receives; export.write_engine_weights), saved to `path`: the weights refitted."""
    import onnx
    import torch

    from accelerators.tensorrt.export import write_engine_weights
    from accelerators.tensorrt.loader import EngineRecord, TensorRTOptions
    from accelerators.tensorrt.webui import WebUITensorRTSession

    class OnnxRefitEngine:
        refittable, device = True, torch.device("cpu")

        def __init__(self):
            self.model, self.refitted = onnx.load(str(exported.path)), 0

        def input_dtype(self, _name):
            return torch.float32

        def refit(self, values, _complete):
            self.refitted += len(write_engine_weights(self.model, values))

    record = EngineRecord(source="probe", profiles=[profile], refit_map=exported.refit_map, load_plan=bytes)
    record.engine = OnnxRefitEngine()
    reason = WebUITensorRTSession(TensorRTOptions(), forward, "sd1").sync_weights(record, weights)
    if reason:
        raise RuntimeError(reason)
    onnx.save(record.engine.model, str(path))
    return record.engine.refitted


script_callbacks.on_model_loaded(_install)
script_callbacks.on_app_started(_routes)
