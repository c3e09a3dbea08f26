"""ComfyUI UNet → ONNX, through the same wrapper signature the engine is called with.

`UNetExportWrapper(x, timesteps, context[, y])` calls ComfyUI's own `UNetModel.forward` with no patches
and no wrappers; the only transformer option it sets is ComfyUI's official `optimized_attention_override`,
pointing at the host's own PyTorch (SDPA) attention: the attention the host picked at start-up (xformers,
sage, sub-quadratic on CPU) is either not exportable or traces its chunk sizes as constants.

Export is TorchScript-based (`dynamo=False`, opset 17, as the peers did: it handles the UNet's dynamic
shapes) with dynamic batch, height, width and tokens. Parameters keep their state-dict names
(`keep_initializers_as_inputs=True` stops the exporter from merging equal-valued tensors such as zero
biases, which would make them unrefittable), then `fold_parameter_layouts` bakes the transposes and
unsqueezes the exporter put on parameters into the initializers and records them: that record is the
refit map (refit.py). Finally the base weights (without LoRA) are written into the initializers, so an
engine built from it is keyed and reusable by its base checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..base import AcceleratorInputError, require_sd_unet
from .profiles import LATENT_SCALE, EngineProfile
from .refit import PREFIX, RefitEntry, RefitMap, apply_transform

INPUT_NAMES = ("x", "timesteps", "context", "y")
OUTPUT_NAME = "out"
OPSET = 17
EXTERNAL_DATA_BYTES = 1_500_000_000   # protobuf's 2 GB limit: larger models keep weights in a side file
_DYNAMIC_AXES = {"x": {0: "batch", 2: "height", 3: "width"}, "timesteps": {0: "batch"},
                 "context": {0: "batch", 1: "tokens"}, "y": {0: "batch"},
                 OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}}


@dataclass(frozen=True)
class UNetSignature:
    """What the engine's inputs look like for one UNet (also the artifact key's model_config)."""
    in_channels: int
    out_channels: int
    context_dim: int
    adm_channels: int            # 0 when the UNet takes no `y` (SD1.x/SD2.x)
    model_channels: int
    family: str
    heads: tuple = ()            # heads of each attention layer in module order: same weights, other function

    @property
    def input_names(self) -> tuple[str, ...]:
        return INPUT_NAMES if self.adm_channels else INPUT_NAMES[:3]

    def as_dict(self) -> dict:
        return {**self.key_fields(), "family": self.family}

    def key_fields(self) -> dict:
        """The architecture as the engine key names it: without the family label, which each host spells its own
        way (ComfyUI's model config class, the WebUI's sd1/sd2/sdxl) for the same UNet."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "context_dim": self.context_dim, "adm_channels": self.adm_channels,
                "model_channels": self.model_channels, "heads": list(self.heads)}


def unet_signature(model) -> UNetSignature:
    """From a ModelPatcher; raises AcceleratorInputError for anything that is not an SD UNet."""
    from ..base import model_family

    unet = require_sd_unet(model, "TensorRT")
    return signature_of_unet(unet, model_family(model))


def signature_of_unet(unet, family: str = "unknown") -> UNetSignature:
    context_dim = 0
    for module in unet.modules():
        if type(module).__name__ == "CrossAttention" and module.to_k.in_features != module.to_q.in_features:
            context_dim = module.to_k.in_features
            break
    if not context_dim:
        raise AcceleratorInputError("TensorRT export needs a UNet with cross-attention (text conditioning); "
                                    "this one has none")
    adm = 0
    if getattr(unet, "num_classes", None) is not None:
        if getattr(unet, "num_classes") != "sequential":
            raise AcceleratorInputError(f"TensorRT export supports text-conditioned UNets; this one is "
                                        f"class-conditional ({unet.num_classes})")
        adm = unet.label_emb[0][0].in_features
    first_conv = unet.input_blocks[0][0]
    heads = tuple(int(m.heads) for m in unet.modules() if type(m).__name__ == "CrossAttention")
    return UNetSignature(in_channels=int(first_conv.in_channels), out_channels=int(unet.out_channels),
                         context_dim=int(context_dim), adm_channels=int(adm),
                         model_channels=int(unet.model_channels), family=family, heads=heads)


def exportable_attention_override():
    """ComfyUI's own PyTorch attention as an `optimized_attention_override` (official transformer option)."""
    import comfy.ldm.modules.attention as attention

    sdpa = attention.get_attention_function("pytorch")

    def export_attention(_chosen, *args, **kwargs):
        return sdpa(*args, **kwargs)

    return export_attention


def _wrapper_class():
    import torch

    class UNetExportWrapper(torch.nn.Module):
        """forward(x, timesteps, context[, y]) → ComfyUI's UNet with no patches, exportable attention."""

        def __init__(self, unet, takes_y: bool):
            super().__init__()
            self.diffusion_model = unet   # the attribute name makes initializer names ModelPatcher keys
            self.takes_y = takes_y
            self.attention = exportable_attention_override()

        def forward(self, x, timesteps, context, y=None):
            options = {"optimized_attention_override": self.attention}
            return self.diffusion_model(x, timesteps, context=context, y=y if self.takes_y else None,
                                        control=None, transformer_options=options)

    return UNetExportWrapper


def sample_inputs(signature: UNetSignature, batch: int, height: int, width: int, tokens: int, device, dtype,
                  seed: int = 0) -> tuple:
    """Inputs in the engine's order, shaped for one request (pixels → latent /8); timesteps stay float32."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, signature.in_channels, height // LATENT_SCALE, width // LATENT_SCALE, generator=gen)
    t = torch.rand(batch, generator=gen) * 999.0
    context = torch.randn(batch, tokens, signature.context_dim, generator=gen)
    out = [x.to(device, dtype), t.to(device, torch.float32), context.to(device, dtype)]
    if signature.adm_channels:
        out.append(torch.randn(batch, signature.adm_channels, generator=gen).to(device, dtype))
    return tuple(out)


@dataclass
class ExportResult:
    path: Path                      # the .onnx file (weights beside it when large)
    refit_map: RefitMap
    signature: UNetSignature
    input_names: tuple[str, ...]
    dtype: str


def export_onnx(unet, folder: str | os.PathLike, profile: EngineProfile, family: str = "unknown",
                base_weights: Mapping | None = None, opset: int = OPSET, wrapper=None) -> ExportResult:
    """Exports `unet` (ComfyUI UNetModel) to `folder`/unet.onnx, traced at the profile's opt shape.

    `wrapper`: the module traced instead of ComfyUI's (another host's UNet behind the same forward(x, timesteps,
    context[, y]) and a `diffusion_model` attribute, so the inputs and initializer names are the same).

    The UNet is exported in its own dtype on its own device (fp16 on GPU for ComfyUI's usual loading;
    fp32 on CPU). `base_weights` ({ModelPatcher key: tensor}) replaces the values of those parameters in the
    file (the base weights of keys a LoRA currently patches in place). Nothing of ComfyUI's model is changed.
    """
    import onnx
    import torch

    signature = signature_of_unet(unet, family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw_path = folder / "raw.onnx"
    path = folder / "unet.onnx"
    param = next(unet.parameters())
    wrapper = (wrapper or _wrapper_class()(unet, takes_y=bool(signature.adm_channels))).eval()
    names = signature.input_names
    args = sample_inputs(signature, profile.batch.opt, profile.height.opt, profile.width.opt, profile.tokens.opt,
                         param.device, param.dtype)
    dynamic_axes = {n: _DYNAMIC_AXES[n] for n in (*names, OUTPUT_NAME)}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes: ComfyUI's asserts
        torch.onnx.export(wrapper, args, str(raw_path), input_names=list(names), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=False,
                          keep_initializers_as_inputs=True, **_torchscript_exporter())
    model = onnx.load(str(raw_path), load_external_data=True)
    for leftover in folder.iterdir():
        if leftover != path:
            leftover.unlink()
    refit_map = fold_parameter_layouts(model)
    if base_weights:
        write_weights(model, refit_map, base_weights)
    save_onnx(model, path)
    return ExportResult(path=path, refit_map=refit_map, signature=signature, input_names=names,
                        dtype=str(param.dtype).removeprefix("torch."))


def _torchscript_exporter() -> dict:
    """`dynamo=False` where torch.onnx.export has the switch (torch < 2.5, e.g. the WebUI's 2.1, has only the
    TorchScript exporter and no such argument)."""
    import inspect

    import torch

    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def save_onnx(model, path: Path) -> None:
    import onnx

    size = sum(len(init.raw_data) for init in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".weights", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _constant_values(model) -> dict:
    """Values of Constant nodes (numpy), for reading Unsqueeze axes."""
    from onnx import numpy_helper

    out = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def fold_parameter_layouts(model) -> RefitMap:
    """Bakes Transpose/Unsqueeze applied to parameter initializers into them; returns the refit map.

    Also removes the initializers from the graph inputs (the exporter listed them there so it would not
    deduplicate them). Every initializer named `diffusion_model.*` becomes a refit entry.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name not in inits]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    outputs = {o.name for o in graph.output}

    transforms: dict[str, tuple] = {name: () for name in inits if name.startswith(PREFIX)}
    while True:  # a parameter may go through several layout ops (e.g. unsqueeze twice)
        constants = _constant_values(model)
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        removed = set()
        for name in transforms:
            users = consumers.get(name, [])
            if len(users) != 1 or users[0].op_type not in ("Transpose", "Unsqueeze") or users[0].input[0] != name:
                continue
            node = users[0]
            if node.output[0] in outputs:
                continue
            array = numpy_helper.to_array(inits[name])
            if node.op_type == "Transpose":
                perm = next((tuple(a.ints) for a in node.attribute if a.name == "perm"),
                            tuple(reversed(range(array.ndim))))
                step = ("transpose", perm)
            else:
                axes = constants.get(node.input[1]) if len(node.input) > 1 else None
                if axes is None and len(node.input) > 1 and node.input[1] in inits:
                    axes = numpy_helper.to_array(inits[node.input[1]])
                if axes is None:
                    continue
                rank = array.ndim + axes.size
                step = ("unsqueeze", tuple(sorted(int(a) % rank for a in axes.reshape(-1))))
            inits[name].CopyFrom(numpy_helper.from_array(apply_transform(array, [step]).copy(), name))
            for user in consumers.get(node.output[0], []):
                for i, value in enumerate(user.input):
                    if value == node.output[0]:
                        user.input[i] = name
            removed.add(id(node))
            transforms[name] = transforms[name] + (step,)
        if not removed:
            break
        kept = [node for node in graph.node if id(node) not in removed]
        del graph.node[:]
        graph.node.extend(kept)
    _drop_unused_constants(model)
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return RefitMap({name: RefitEntry(key=name, transform=t, shape=shapes[name]) for name, t in transforms.items()
                     if name in shapes})


def _drop_unused_constants(model) -> None:
    """Removes Constant nodes left without consumers by the folding (axes of the removed Unsqueezes)."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def write_weights(model, refit_map: RefitMap, weights_by_key: Mapping) -> list[str]:
    """Writes {ModelPatcher key: UNet-layout tensor} into the matching initializers (transform applied).

    Used to put base weights into a fresh export. Returns the engine names written.
    """
    values = {}
    for name, entry in refit_map.entries.items():
        if entry.key in weights_by_key:
            values[name] = apply_transform(weights_by_key[entry.key], entry.transform)
    return write_engine_weights(model, values)


def write_engine_weights(model, values_by_name: Mapping) -> list[str]:
    """Writes {engine weight name: tensor already in engine layout} into the initializers — exactly what
    the TensorRT refitter receives, so onnxruntime can check refit values on a machine without TensorRT."""
    import numpy as np
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    written = []
    for name, value in values_by_name.items():
        if name not in inits:
            raise KeyError(f"the ONNX graph has no weight named {name}")
        array = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value)
        old = inits[name]
        if tuple(array.shape) != tuple(old.dims):
            raise ValueError(f"weight {name}: shape {tuple(array.shape)} does not fit {tuple(old.dims)}")
        target = numpy_helper.to_array(old).dtype
        old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array.astype(target)), name))
        written.append(name)
    return written
