"""The whole UNet forward compiled ahead of time by dynamo's precompile, loaded by a new process onto the live
model without tracing or compiling: the warm-restart artifact of inductor+cudagraphs where torch has it.

Why this and not an AOTInductor package: on torch 2.11+cu130 on an H100 the AOTInductor loader crashed the
process while opening a CUDA package, while a precompiled SD1.5 UNet (kernels included) loaded in a new process
in seconds even with inductor's cache empty, traced nothing and gave the builder's output (docs/benchmarks.md).
It is ordinary inductor code run by Python, so a failure is an exception, not a crash. Where torch has no
precompile, the lane uses torch.compile with the compile-cache artifacts (artifacts.py) instead.

What it uses is torch's experimental module precompile (`torch._dynamo.config.enable_aot_compile`,
`OptimizedModule._aot_compile` / `_save_aot_compiled_module` / `_load_aot_compiled_module`, present in torch
2.11 and 2.13); this module is the one place that touches it, and tests/accelerators/test_precompile.py runs
it on the real ComfyUI, so a torch that changes it fails there. One full graph of the UNet's forward is compiled
for one input signature. The compiled code reads the weights from the module on every call (a LoRA patched in
place is seen; a replaced Parameter too), so the file holds code only and serves every checkpoint of the
architecture.

Guards: ComfyUI's layer classes are defined inside `comfy.ops` classes, which dynamo's guard serializer refuses
("defined in local scope"), so only the input tensors' guards are kept (`torch.compiler.
keep_tensor_guards_unsafe`). The caller must then use it only for what it was built for, which the session
does: one shape bucket (`matches` checks the inputs), no patches in transformer_options (they are baked in).
Inductor's own size/stride asserts still stop a weight of another layout. The tensor guards compare dispatch
keys with the thread's state at load time, so it is loaded and run under inference_mode, as ComfyUI samples.

Host-agnostic: any `UNetModel`-like module called as `unet(x, timesteps, context=..., y=..., transformer_options=
...)`. Nothing imports torch at module level.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..base import Availability

PRECOMPILED_FILE = "unet.precompiled"
RECORD_FILE = "record.json"
PRECOMPILE_FILES = (PRECOMPILED_FILE, RECORD_FILE)
FORMAT_VERSION = 1
INPUT_NAMES = ("x", "timesteps", "context", "y")


class PackageMismatch(RuntimeError):
    """The precompiled UNet cannot run in this environment: the message names what differs."""


class PackageUnusable(RuntimeError):
    """No precompiled UNet can be made here (the message says why)."""


def available() -> Availability:
    try:
        import torch
        import torch._dynamo.aot_compile as aot_compile
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception as exc:
        return Availability(False, f"dynamo precompile unavailable: {exc}")
    missing = [name for name, ok in (
        ("torch._dynamo.config.enable_aot_compile", hasattr(torch._dynamo.config, "enable_aot_compile")),
        ("torch._dynamo.aot_compile.ModelInput", hasattr(aot_compile, "ModelInput")),
        ("OptimizedModule._aot_compile", hasattr(OptimizedModule, "_aot_compile")),
        ("OptimizedModule._load_aot_compiled_module", hasattr(OptimizedModule, "_load_aot_compiled_module")),
        ("torch.compiler.keep_tensor_guards_unsafe", hasattr(torch.compiler, "keep_tensor_guards_unsafe")))
        if not ok]
    if missing:
        return Availability(False, f"torch {torch.__version__} has no dynamo precompile ({missing[0]})")
    return Availability(True, f"dynamo precompile (torch {torch.__version__})")


# ---- describing tensors -------------------------------------------------------------------------------------
def describe_tensor(tensor) -> dict:
    """What the compiled code assumes about a tensor: JSON-able, compared field by field."""
    return {"shape": list(tensor.shape), "stride": list(tensor.stride()),
            "dtype": str(tensor.dtype).removeprefix("torch."), "device": str(tensor.device)}


def first_difference(expected: dict, actual: dict) -> str:
    for field in ("shape", "stride", "dtype", "device"):
        if expected[field] != actual[field]:
            return f"{field} {actual[field]} instead of {expected[field]}"
    return ""


def inputs_mismatch(recorded: list[dict], inputs: tuple, what: str) -> str:
    """'' when `inputs` have the recorded shapes, strides, dtypes and devices (y=None: the three-input
    signature), else why not, naming `what` takes them."""
    given = list(inputs)
    while given and given[-1] is None:
        given.pop()
    if len(given) != len(recorded):
        return f"{what} takes {len(recorded)} inputs ({', '.join(i['name'] for i in recorded)}), got {len(given)}"
    for expected, tensor in zip(recorded, given):
        if tensor is None:
            return f"{expected['name']} is missing"
        difference = first_difference(expected, describe_tensor(tensor))
        if difference:
            return f"{expected['name']} has {difference}"
    return ""


def check_input_count(inputs: tuple) -> tuple:
    inputs = tuple(inputs)
    if len(inputs) == 4 and inputs[3] is None:
        inputs = inputs[:3]
    if len(inputs) not in (3, 4) or any(t is None for t in inputs):
        raise ValueError("inputs must be (x, timesteps, context) or (x, timesteps, context, y)")
    return inputs


def unet_forward_module(unet, transformer_options: dict):
    """The module that is compiled: the UNet's forward with a fixed signature, the UNet as its only child."""
    import torch

    class UNetForward(torch.nn.Module):
        def __init__(self, unet, transformer_options: dict):
            super().__init__()
            self.unet = unet
            # not a tensor: the dict is baked into the trace (patches in it are traced as code)
            self.transformer_options = transformer_options

        def forward(self, x, timesteps, context, y=None):
            # a fresh dict per call, as ComfyUI passes it: the UNet writes into it while it runs
            return self.unet(x, timesteps, context=context, y=y,
                             transformer_options=dict(self.transformer_options))

    return UNetForward(unet, transformer_options)


# ---- the precompiled UNet -------------------------------------------------------------------------------------
def _optimized(module, inductor_configs: dict | None):
    import torch

    options = {**(inductor_configs or {}), "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    return torch.compile(module, fullgraph=True, backend="inductor", options=options)


class PrecompiledUNet:
    """A precompiled UNet forward for one static input signature, run on the module it is bound to."""

    def __init__(self, optimized, wrapper, record: dict):
        self.optimized = optimized   # torch.compile's OptimizedModule, its forward the loaded compiled code
        self.wrapper = wrapper       # the module the compiled code reads its weights from (wrapper.unet)
        self.record = record
        self.inputs: list[dict] = record["inputs"]

    @classmethod
    def build(cls, unet, inputs: tuple, transformer_options: dict, folder: Path,
              inductor_configs: dict | None = None) -> "PrecompiledUNet":
        """Compiles `unet` for exactly these inputs ((x, timesteps, context) or with y), writes the file and
        its record to `folder` and returns it, bound to `unet`. PackageUnusable when torch refuses (the cause
        in the message)."""
        import torch
        from torch._dynamo.aot_compile import ModelInput

        inputs = check_input_count(inputs)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        wrapper = unet_forward_module(unet, dict(transformer_options or {}))
        optimized = _optimized(wrapper, inductor_configs)
        was_training = unet.training
        unet.eval()
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):
                optimized._aot_compile([ModelInput(args=tuple(inputs), kwargs={},
                                                   contexts=[torch.inference_mode()])])
                blob = optimized._save_aot_compiled_module()
        except Exception as exc:
            raise PackageUnusable(f"dynamo precompile failed: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:300]}") from exc
        finally:
            unet.train(was_training)
        record = {"format": FORMAT_VERSION, "torch": torch.__version__,
                  "inputs": [dict(describe_tensor(t), name=name) for name, t in zip(INPUT_NAMES, inputs)]}
        (folder / PRECOMPILED_FILE).write_bytes(blob)
        (folder / RECORD_FILE).write_text(json.dumps(record, indent=1))
        return cls(optimized, wrapper, record)

    @classmethod
    def load(cls, folder: Path, unet, transformer_options: dict | None = None) -> "PrecompiledUNet":
        """Loads a file written by `build` onto `unet` (no trace, no compile: seconds); PackageMismatch when it
        was written by another torch or format."""
        import torch

        folder = Path(folder)
        record = json.loads((folder / RECORD_FILE).read_text())
        if record.get("format") != FORMAT_VERSION:
            raise PackageMismatch(f"{folder / RECORD_FILE} has format {record.get('format')!r}, this code reads "
                                  f"{FORMAT_VERSION}")
        if record.get("torch") != torch.__version__:   # compiled code is tied to the torch that generated it
            raise PackageMismatch(f"the precompiled UNet was built with torch {record.get('torch')}, this is "
                                  f"torch {torch.__version__}")
        wrapper = unet_forward_module(unet, dict(transformer_options or {}))
        optimized = _optimized(wrapper, None)
        # loaded in the mode it runs in: the tensor guards take the thread's dispatch state at load time
        with torch._dynamo.config.patch(enable_aot_compile=True), torch.inference_mode():
            optimized._load_aot_compiled_module((folder / PRECOMPILED_FILE).read_bytes())
        return cls(optimized, wrapper, record)

    # -- the interface the compile session uses ----------------------------------------
    def needs_rebind(self, unet) -> bool:
        return self.wrapper.unet is not unet

    def bind(self, unet) -> None:
        """Runs the compiled code on `unet` (another UNet of the same architecture and weight layouts)."""
        self.wrapper.unet = unet

    def matches(self, inputs: tuple) -> str:
        """'' when these inputs have the compiled shapes, strides, dtypes and devices, else why not."""
        return inputs_mismatch(self.inputs, inputs, "the precompiled UNet")

    def __call__(self, x, timesteps, context, y=None):
        inputs = (x, timesteps, context) if y is None else (x, timesteps, context, y)
        reason = self.matches(inputs)
        if reason:
            raise ValueError(f"inputs do not fit the precompiled UNet: {reason}")
        return self.optimized(*inputs)


def precompile_files(folder: Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {name: (folder / name).read_bytes() for name in PRECOMPILE_FILES}
