"""A UNet forward compiled ahead of time (AOTInductor) into a package a new process loads without compiling.

`torch.compile` recompiles (or at best re-traces) in every new process; an AOTInductor package is a shared
library that `aoti_load_package` opens in well under a second. The package holds code only: the weights stay
out of it (`package_constants_in_so=False`) and are bound from the live model with `load_constants(...,
user_managed=True)`, so the compiled code reads the model's own tensors. A LoRA patched in place is then seen
on the next call without a reload, and one package serves every checkpoint of the architecture.

What the loader does not do, and this module does instead:
- it checks nothing about the tensors it is given (a wrong shape, stride or dtype gives wrong numbers or reads
  out of bounds), so `bind` compares every weight with what was recorded at build time (`weights.json`);
- it crashes the process when called before weights are bound, so `__call__` refuses that;
- it keeps raw pointers to the bound tensors, so we keep references to them, and a Parameter replaced by a
  new tensor (ComfyUI's `set_attr_param`) is invisible to it: `needs_rebind` says when to `bind` again;
- the package is built for one input signature (static shapes, one dtype and device): `matches` says why
  another input cannot use it;
- a loader that fails may kill the process instead of raising (a segfault on torch 2.11+cu130 on an H100), so
  a new package is first loaded, run and (on CUDA) captured in a CUDA graph by a child process
  (`verify_in_child`); only a package that passed there is loaded here or stored. Before the first UNet
  package of an environment (torch, device, dtype), `probe_environment` puts a small package of the same kind
  through that check: seconds, where a UNet package takes minutes to build only to crash there.

Host-agnostic: works on any `comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`-like module called as
`unet(x, timesteps, context=..., y=..., transformer_options=...)`. Nothing imports torch at module level.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .base import Availability

PACKAGE_FILE = "unet.pt2"
WEIGHTS_FILE = "weights.json"
PACKAGE_FILES = (PACKAGE_FILE, WEIGHTS_FILE)
FORMAT_VERSION = 2   # 2: weights.json records the child process that verified the package
VERIFY_TIMEOUT_S = 300   # a child that loads and runs the package once; a full SDXL UNet takes seconds
INPUT_NAMES = ("x", "timesteps", "context", "y")
WRAPPER_PREFIX = "unet."   # the exported module holds the UNet as `unet`: every weight's name starts with it
# settings the design depends on, applied over any caller's configs:
REQUIRED_INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,   # weights come from the live model, never from the package
    "always_keep_tensor_constants": True,            # else small 1-D weights are baked into the code as literals
    "freezing": False,                                # freezing folds weights into the graph: they must stay inputs
}


class PackageMismatch(RuntimeError):
    """The package cannot run with these weights or in this environment: the message names what differs."""


class PackageUnusable(RuntimeError):
    """A freshly built package did not load and run in a child process: this environment cannot use packages
    of this kind (the message says how the child failed)."""


def available() -> Availability:
    try:
        import torch
        import torch._inductor as inductor
    except Exception as exc:
        return Availability(False, f"AOTInductor unavailable: {exc}")
    missing = [name for name in ("aoti_compile_and_package", "aoti_load_package") if not hasattr(inductor, name)]
    if missing:
        return Availability(False, f"torch {torch.__version__} has no {' or '.join(missing)} "
                                   f"(AOTInductor packages need torch 2.6 or newer)")
    return Availability(True, f"AOTInductor packages (torch {torch.__version__})")


# ---- describing tensors -------------------------------------------------------------------------------------
def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_tensor(tensor) -> dict:
    """What the compiled code assumes about a tensor: JSON-able, compared field by field."""
    return {"shape": list(tensor.shape), "stride": list(tensor.stride()), "dtype": _dtype_name(tensor.dtype),
            "device": str(tensor.device)}


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


def unet_forward_module(unet, transformer_options: dict):
    """The module that is exported: the UNet's forward with a fixed signature, the UNet as its only child."""
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


def live_weights(unet) -> dict:
    """Every parameter and buffer of `unet` under the name the package knows it by (tied ones under each name)."""
    named = {WRAPPER_PREFIX + name: t for name, t in unet.named_parameters(remove_duplicate=False)}
    named.update((WRAPPER_PREFIX + name, t) for name, t in unet.named_buffers(remove_duplicate=False))
    return named


# ---- the package --------------------------------------------------------------------------------------------
class PackagedUNet:
    """One AOTInductor package of a UNet forward for one static input signature, weights supplied from the live
    model."""

    def __init__(self, loader, record: dict, folder: Path):
        self.loader = loader
        self.folder = Path(folder)
        self.weights: dict[str, dict] = record["weights"]
        self.inputs: list[dict] = record["inputs"]
        self.record = record
        # the tensors the loader reads through raw pointers: kept alive here, and their addresses at bind time
        self.bound: dict = {}
        self.bound_pointers: dict[str, int] = {}

    # -- building and loading ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, unet, inputs: tuple, transformer_options: dict, folder: Path,
              inductor_configs: dict | None = None) -> "PackagedUNet":
        """Exports and compiles `unet` for exactly these inputs ((x, timesteps, context) or with y), writes the
        package to `folder` and returns it bound to `unet`."""
        import torch

        inputs = check_input_count(inputs)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        package_path = folder / PACKAGE_FILE
        package_path.unlink(missing_ok=True)   # the packager refuses to overwrite in some versions
        module = unet_forward_module(unet, dict(transformer_options or {}))
        was_training = unet.training
        unet.eval()   # dropout and the like traced off, as ComfyUI runs the UNet
        try:
            with torch.no_grad():
                exported = torch.export.export(module, tuple(inputs), strict=False)
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(package_path),
                    inductor_configs={**(inductor_configs or {}), **REQUIRED_INDUCTOR_CONFIGS})
        finally:
            unet.train(was_training)

        live = live_weights(unet)
        inputs_record = [dict(describe_tensor(t), name=name) for name, t in zip(INPUT_NAMES, inputs)]
        # every weight the package might read, for the child; narrowed below to the ones it does read
        record = {"format": FORMAT_VERSION, "torch": torch.__version__, "inputs": inputs_record,
                  "weights": {name: describe_tensor(t) for name, t in live.items()}}
        (folder / WEIGHTS_FILE).write_text(json.dumps(record, indent=1))
        verified = verify_in_child(folder)
        if "error" in verified:
            raise PackageUnusable(verified["error"])
        # the child refused any tensor that is not a weight of the model (one the trace created: nothing to bind)
        record["weights"] = {name: record["weights"][name] for name in verified["constants"]}
        record["verified"] = {k: v for k, v in verified.items() if k != "constants"}
        (folder / WEIGHTS_FILE).write_text(json.dumps(record, indent=1))
        package = cls(_open_loader(torch, package_path, inputs_record), record, folder)
        package.bind(unet)
        return package

    @classmethod
    def load(cls, folder: Path) -> "PackagedUNet":
        """Opens a package written by `build` (or `write_package_files`); not bound: call `bind` before use."""
        import torch

        folder = Path(folder)
        record = json.loads((folder / WEIGHTS_FILE).read_text())
        if record.get("format") != FORMAT_VERSION:
            raise PackageMismatch(f"{folder / WEIGHTS_FILE} has format {record.get('format')!r}, "
                                  f"this code reads {FORMAT_VERSION}")
        # the compiled library is tied to the torch it was built with: a different one may crash on load
        if record.get("torch") != torch.__version__:
            raise PackageMismatch(f"the package was built with torch {record.get('torch')}, "
                                  f"this is torch {torch.__version__}")
        loader = _open_loader(torch, folder / PACKAGE_FILE, record["inputs"])
        expected, packaged = set(record["weights"]), set(loader.get_constant_fqns())
        if expected != packaged:
            odd = sorted(expected ^ packaged)[0]
            raise PackageMismatch(f"{WEIGHTS_FILE} does not describe this package's weights (e.g. {odd})")
        return cls(loader, record, folder)

    # -- weights ----------------------------------------------------------------------------------------------
    def bind(self, unet) -> None:
        """Points the compiled code at `unet`'s own tensors after checking each against the recorded layout;
        raises PackageMismatch naming the first weight that differs (the previous binding then stays)."""
        live = live_weights(unet)
        for name, expected in self.weights.items():
            tensor = live.get(name)
            if tensor is None:
                raise PackageMismatch(f"weight {name} is missing from the model")
            difference = first_difference(expected, describe_tensor(tensor))
            if difference:
                raise PackageMismatch(f"weight {name} has {difference}")
        chosen = {name: live[name] for name in self.weights}
        self.loader.load_constants(chosen, check_full_update=True, user_managed=True)
        self.bound = chosen
        self.bound_pointers = {name: t.data_ptr() for name, t in chosen.items()}

    def needs_rebind(self, unet) -> bool:
        """Whether a weight was replaced (a new tensor, or new storage under the same Parameter) since `bind`:
        the compiled code would still read the old one."""
        if not self.bound:
            return True
        live = live_weights(unet)
        for name, tensor in self.bound.items():
            current = live.get(name)
            if current is not tensor or current.data_ptr() != self.bound_pointers[name]:
                return True
        return False

    # -- running ----------------------------------------------------------------------------------------------
    def matches(self, inputs: tuple) -> str:
        """'' when these inputs have the packaged shapes, strides, dtypes and devices, else why not."""
        return inputs_mismatch(self.inputs, inputs, "the package")

    def __call__(self, x, timesteps, context, y=None):
        if not self.bound:   # the loader dereferences unset weight pointers: a crash, not an exception
            raise RuntimeError("the AOTInductor package is not bound to weights: call bind(unet) first")
        inputs = (x, timesteps, context) if y is None else (x, timesteps, context, y)
        # compiled for one signature: another shape would index out of bounds instead of failing
        reason = self.matches(inputs)
        if reason:
            raise ValueError(f"inputs do not fit the AOTInductor package: {reason}")
        out = self.loader(*inputs)
        return out[0] if isinstance(out, (list, tuple)) else out


def _open_loader(torch, package_path: Path, inputs_record: list[dict]):
    """The package's loader, on the device the package was built for (cuda:1 stays cuda:1)."""
    device = torch.device(inputs_record[0]["device"])
    index = device.index if device.type != "cpu" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(package_path), device_index=index)


# ---- the child process that proves a new package loads -------------------------------------------------------
# Runs with the same interpreter; imports this package by its path under a private name (the host's name for
# it, e.g. ComfyUI's custom_nodes loader, is not importable from a plain interpreter).
_CHILD_BOOTSTRAP = """
import faulthandler, importlib.util, sys
faulthandler.enable()   # a crash in the loader leaves the Python stack on stderr
spec = importlib.util.spec_from_file_location(
    "_comfy_accel_package_check", sys.argv[1] + "/__init__.py", submodule_search_locations=[sys.argv[1]])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
from _comfy_accel_package_check.aot_package import verify_here
sys.exit(verify_here(sys.argv[2]))
"""
_RESULT_PREFIX = "PACKAGE-VERIFIED "
_STAGE_PREFIX = "PACKAGE-STAGE "   # the child's progress, so a crash can say what it was doing


def verify_in_child(folder: Path, timeout: float | None = None) -> dict:
    """Loads the package in `folder` in a fresh process, binds stand-in weights of the recorded layouts (zeros,
    views of one buffer), runs it once and, on CUDA, captures and replays that call as a CUDA graph. Returns what the child reports
    ({"constants": [names the package reads], "load_s": ..., ...}) or {"error": why it failed}: a loader
    that crashes kills the child, not the caller."""
    import subprocess

    timeout = float(os.environ.get("COMFY_ACCEL_AOT_VERIFY_TIMEOUT_S", VERIFY_TIMEOUT_S)) if timeout is None \
        else timeout
    command = [sys.executable, "-c", _CHILD_BOOTSTRAP, str(Path(__file__).resolve().parent), str(folder)]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"loading the package in a child process did not finish in {timeout:g} s"}
    return child_outcome(finished.returncode, finished.stdout, finished.stderr)


def child_outcome(returncode: int, stdout: str, stderr: str) -> dict:
    """What a verifying child's exit says: its report, or one line on how it failed (and at which stage)."""
    import signal

    stages = [line[len(_STAGE_PREFIX):].strip() for line in stdout.splitlines() if line.startswith(_STAGE_PREFIX)]
    while_doing = f" while {stages[-1]}" if stages else ""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return {"error": f"loading the package killed a child process ({name}{while_doing})"}
    report = [line for line in stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if returncode == 0 and report:
        return json.loads(report[-1][len(_RESULT_PREFIX):])
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no output")
    return {"error": f"loading the package in a child process failed (exit {returncode}{while_doing}): "
                     f"{last[:300]}"}


def verify_here(folder: str) -> int:
    """The child's side of `verify_in_child`: exit 0 and one report line when the package loads, runs and
    (on CUDA) replays as a CUDA graph with the same output as the direct call."""
    import time

    import torch

    def stage(what: str) -> None:
        print(_STAGE_PREFIX + what, flush=True)

    folder = Path(folder)
    record = json.loads((folder / WEIGHTS_FILE).read_text())
    started = time.monotonic()
    stage("opening the package")
    loader = _open_loader(torch, folder / PACKAGE_FILE, record["inputs"])
    loaded = time.monotonic()
    names = list(loader.get_constant_fqns())
    unknown = [name for name in names if name not in record["weights"]]
    if unknown:
        print(f"the package reads {len(unknown)} tensor(s) that are not weights of the model, e.g. {unknown[0]}",
              file=sys.stderr)
        return 3
    stage("binding stand-in weights")
    weights = _stand_in_weights(torch, {name: record["weights"][name] for name in names})
    loader.load_constants(weights, check_full_update=True, user_managed=True)
    generator = torch.Generator().manual_seed(0)

    def stand_in_input(description: dict):
        dtype = getattr(torch, description["dtype"])
        base = torch.empty_strided(description["shape"], description["stride"], dtype=dtype)
        if dtype.is_floating_point:
            base.copy_(torch.randn(base.shape, generator=generator) * 0.02)
        else:
            base.copy_(torch.randint(0, 1000, base.shape, generator=generator))
        return base.to(description["device"])

    inputs = [stand_in_input(description) for description in record["inputs"]]
    with torch.no_grad():
        stage("running it")
        out = loader(*inputs)
        out = out[0] if isinstance(out, (list, tuple)) else out
        if tuple(out.shape) != tuple(inputs[0].shape):
            print(f"the package returned shape {tuple(out.shape)} for input {tuple(inputs[0].shape)}",
                  file=sys.stderr)
            return 4
        ran = time.monotonic()
        report = {"constants": names, "load_s": round(loaded - started, 3), "call_s": round(ran - loaded, 3)}
        if out.is_cuda:   # what the session does with it: one CUDA graph per bucket
            stage("capturing a CUDA graph of it")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                loader(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = loader(*inputs)
            static = static[0] if isinstance(static, (list, tuple)) else static
            stage("replaying that CUDA graph")
            graph.replay()
            torch.cuda.synchronize()
            if not torch.equal(static, out):
                print("the package's CUDA graph replay differs from its direct call", file=sys.stderr)
                return 5
            report["graph_s"] = round(time.monotonic() - ran, 3)
    print(_RESULT_PREFIX + json.dumps(report), flush=True)
    return 0


def _stand_in_weights(torch, descriptions: dict) -> dict:
    """Zero tensors of the recorded layouts, all views of one buffer per device: the child checks that the code
    loads and runs, not what it computes, and must not hold a second copy of the model's weights (1.7 GB for
    SD1.5, 5 GB for SDXL) while the parent holds the first."""
    def extent_bytes(d: dict) -> int:
        itemsize = torch.empty((), dtype=getattr(torch, d["dtype"])).element_size()
        return (1 + sum((size - 1) * stride for size, stride in zip(d["shape"], d["stride"]))) * itemsize

    largest: dict[str, int] = {}
    for d in descriptions.values():
        largest[d["device"]] = max(largest.get(d["device"], 0), extent_bytes(d))
    buffers = {device: torch.zeros(-(-size // 16) * 16, dtype=torch.uint8, device=device)
               for device, size in largest.items()}
    return {name: torch.as_strided(buffers[d["device"]].view(getattr(torch, d["dtype"])), d["shape"], d["stride"])
            for name, d in descriptions.items()}


# ---- whether this environment can use packages at all ---------------------------------------------------------
PROBE_CONTEXT_DIM = 64


def _probe_module(torch):
    """A few UNet-like layers with the UNet's call signature: the smallest package of the same kind (weights
    bound from outside, convolutions, a norm, a linear on the text context)."""
    class ProbeUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 32, 3, padding=1)
            self.time_embed = torch.nn.Linear(1, 32)
            self.context_proj = torch.nn.Linear(PROBE_CONTEXT_DIM, 32)
            self.norm = torch.nn.GroupNorm(8, 32)
            self.conv_out = torch.nn.Conv2d(32, 4, 3, padding=1)

        def forward(self, x, timesteps, context=None, y=None, transformer_options=None):
            h = self.conv_in(x)
            h = h + self.time_embed(timesteps[:, None].to(x.dtype))[:, :, None, None]
            h = h + self.context_proj(context).mean(1)[:, :, None, None]
            return self.conv_out(torch.nn.functional.silu(self.norm(h)))

    return ProbeUNet()


def probe_environment(device, dtype, folder: Path, inductor_configs: dict | None = None) -> str:
    """Builds a small package of the UNet package's kind for `device` and `dtype` and has a child process load,
    run and (on CUDA) graph-capture it: "" when it passed, else the child's one-line failure. Takes seconds,
    where a UNet package takes minutes to build, so an environment whose loader crashes (torch 2.11+cu130 on an
    H100: SIGSEGV while opening a package) is found before a UNet is built. Errors other than the child's
    (e.g. the export) propagate: they say nothing about the loader."""
    import torch

    module = _probe_module(torch).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=generator).to(device=device, dtype=dtype),
              torch.tensor([999.0, 999.0], device=device),
              torch.randn(2, 77, PROBE_CONTEXT_DIM, generator=generator).to(device=device, dtype=dtype))
    try:
        PackagedUNet.build(module, inputs, {}, Path(folder), inductor_configs=inductor_configs)
    except PackageUnusable as exc:
        return str(exc)
    return ""


def check_input_count(inputs: tuple) -> tuple:
    inputs = tuple(inputs)
    if len(inputs) == 4 and inputs[3] is None:
        inputs = inputs[:3]
    if len(inputs) not in (3, 4) or any(t is None for t in inputs):
        raise ValueError("inputs must be (x, timesteps, context) or (x, timesteps, context, y)")
    return inputs


# ---- storing a package ----------------------------------------------------------------------------------------
def package_files(folder: Path) -> dict[str, bytes]:
    """The package's files as {name: bytes}, for the artifact store."""
    folder = Path(folder)
    return {name: (folder / name).read_bytes() for name in PACKAGE_FILES}


def write_package_files(files: dict[str, bytes], folder: Path) -> Path:
    """Writes files from `package_files` into `folder` (created), ready for `PackagedUNet.load`."""
    missing = [name for name in PACKAGE_FILES if name not in files]
    if missing:
        raise ValueError(f"not a complete package: {', '.join(missing)} missing")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in PACKAGE_FILES:   # only our own names: nothing from the store chooses a path
        (folder / name).write_bytes(files[name])
    return folder
