"""TensorRT 10 engines: build from the exported ONNX, load, run, refit — through TensorRT's public Python API.

Build: `Builder` → network → `OnnxParser.parse_from_file` → `BuilderConfig` with FP16 and REFIT, one
optimization profile per `EngineProfile`, the shared timing cache, and an `IProgressMonitor` that reports
every phase to `events.progress` (and to the node's ComfyUI progress bar). The serialized plan is the
cache payload; the ONNX is deleted by the caller once this returns.

Run: one execution context; per call the tightest profile is selected (`set_optimization_profile_async`
only when it changes), input shapes and device addresses are set on torch's current stream, and
`execute_async_v3` writes into a torch tensor — no copies beyond dtype casts.

Refit: `Refitter.set_named_weights` for the changed weights only (plus any TensorRT reports missing
because it fused them with a changed one), then `refit_cuda_engine`.

`import tensorrt` happens only inside these functions: the pack loads without it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .. import events
from ..base import BackendUnavailable
from .profiles import EngineProfile

log = logging.getLogger("comfy_accel")
ACCELERATOR = "tensorrt"


def trt_module():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(f"tensorrt not installed (pip install tensorrt): {exc}") from None
    return trt


def trt_version() -> str:
    return str(trt_module().__version__)


class _Logger:
    """TensorRT's ILogger routed to Python logging (warnings and errors only)."""

    _instance = None

    @classmethod
    def get(cls):
        if cls._instance is None:
            trt = trt_module()

            class Logger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)

                def log(self, severity, msg):
                    if severity <= trt.ILogger.Severity.ERROR:
                        log.error("[comfy-accel] TensorRT: %s", msg)
                    elif severity <= trt.ILogger.Severity.WARNING:
                        log.warning("[comfy-accel] TensorRT: %s", msg)

            cls._instance = Logger()
        return cls._instance


def _progress_monitor(task: str, node_id, on_progress: Callable[[float, str], None] | None):
    """An IProgressMonitor forwarding TensorRT's build phases (share done of the top-level phase)."""
    trt = trt_module()

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[str | None, int]] = {}
            self.top: tuple[str, int, int] | None = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = (parent_phase, num_steps)
            if parent_phase is None:
                self.top = (phase_name, 0, max(1, num_steps))
                self._report(phase_name)

        def step_complete(self, phase_name, step):
            if self.top and phase_name == self.top[0]:
                self.top = (phase_name, step + 1, self.top[2])
                self._report(phase_name)
            return True   # False would cancel the build

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)

        def _report(self, phase_name):
            name, done, total = self.top
            events.progress(task, done, total, accelerator=ACCELERATOR, node_id=node_id, message=phase_name)
            if on_progress is not None:
                on_progress(done / total, phase_name)

    return Monitor()


@dataclass
class BuildSettings:
    fp16: bool = True
    refittable: bool = True
    optimization_level: int = 3          # TensorRT's default; 5 tunes longer for a few % more
    workspace_bytes: int | None = None   # None: TensorRT's default (all device memory)

    def as_key(self) -> dict:
        return {"fp16": self.fp16, "refittable": self.refittable, "optimization_level": self.optimization_level}


def build_engine(onnx_path: Path, input_names: Sequence[str], profiles: Sequence[EngineProfile],
                 shapes_of: Callable[[EngineProfile], Mapping], settings: BuildSettings,
                 timing_cache: bytes | None = None, task: str = "TensorRT build", node_id=None,
                 on_progress: Callable[[float, str], None] | None = None) -> tuple[bytes, bytes]:
    """Builds a serialized engine; returns (plan bytes, updated timing cache bytes)."""
    trt = trt_module()
    logger = _Logger.get()
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT could not parse the exported UNet: {errors[:400]}")
    config = builder.create_builder_config()
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes_of(profile).items():
            if name in input_names:
                trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    config.progress_monitor = _progress_monitor(task, node_id, on_progress)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable("TensorRT failed to build the engine (see the TensorRT errors in the log)")
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(plan)), new_cache


_TORCH_DTYPES = {}


def _torch_dtype(trt_dtype):
    import torch

    trt = trt_module()
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                              trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool})
        if hasattr(trt.DataType, "BF16"):
            _TORCH_DTYPES[trt.DataType.BF16] = torch.bfloat16
        if hasattr(trt.DataType, "INT64"):
            _TORCH_DTYPES[trt.DataType.INT64] = torch.int64
    return _TORCH_DTYPES[trt_dtype]


def _trt_weights_dtype(torch_dtype):
    import torch

    trt = trt_module()
    table = {torch.float32: trt.DataType.FLOAT, torch.float16: trt.DataType.HALF}
    if hasattr(trt.DataType, "BF16"):
        table[torch.bfloat16] = trt.DataType.BF16
    return table[torch_dtype]


@dataclass
class TensorRTEngine:
    """A deserialized engine with one execution context, on one CUDA device."""
    engine: object
    context: object
    device: object
    profiles: list[EngineProfile]
    input_names: tuple[str, ...]
    output_name: str
    nbytes: int                               # plan size (≈ weights) + activation memory of the context
    runtime: object = None                    # kept alive as long as the engine
    active_profile: int | None = None
    weight_dtypes: dict = field(default_factory=dict)

    @classmethod
    def load(cls, plan: bytes, profiles: Sequence[EngineProfile], device=None) -> "TensorRTEngine":
        import torch

        trt = trt_module()
        device = torch.device(device or "cuda")
        with torch.cuda.device(device):
            runtime = trt.Runtime(_Logger.get())
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise BackendUnavailable("TensorRT could not load the engine (built by another TensorRT version "
                                         "or for another GPU?)")
            context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        activations = getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size
        if len(profiles) != engine.num_optimization_profiles:
            profiles = profiles_of_engine(engine, inputs)
        return cls(engine=engine, context=context, device=device, profiles=list(profiles), input_names=inputs,
                   output_name=outputs[0], nbytes=len(plan) + int(activations), runtime=runtime)

    @property
    def refittable(self) -> bool:
        return bool(getattr(self.engine, "refittable", False))

    def input_dtype(self, name: str):
        return _torch_dtype(self.engine.get_tensor_dtype(name))

    def run(self, profile_index: int, inputs: Mapping[str, object]):
        """inputs: {name: torch tensor on the engine's device}; returns the output tensor."""
        import torch

        stream = torch.cuda.current_stream(self.device)
        if self.active_profile != profile_index:
            self.context.set_optimization_profile_async(profile_index, stream.cuda_stream)
            self.active_profile = profile_index
        keep = []
        for name in self.input_names:
            tensor = inputs[name].to(self.device, self.input_dtype(name)).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=_torch_dtype(self.engine.get_tensor_dtype(self.output_name)),
                          device=self.device)
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT errors in the log)")
        return out

    def refit(self, values: Mapping[str, object], complete: Callable[[set[str]], Mapping[str, object]]) -> int:
        """Sets `values` ({engine weight name: torch tensor}); `complete(names)` supplies the current value
        of any further weight TensorRT asks for. Returns the number of weights set."""
        import torch

        trt = trt_module()
        refitter = trt.Refitter(self.engine, _Logger.get())
        held = []

        def put(name, tensor):
            tensor = tensor.detach().to(self.device).contiguous()
            held.append(tensor)
            weights = trt.Weights(_trt_weights_dtype(tensor.dtype), tensor.data_ptr(), tensor.numel())
            if not refitter.set_named_weights(name, weights, trt.TensorLocation.DEVICE):
                raise BackendUnavailable(f"TensorRT refused new weights for {name}")

        for name, tensor in values.items():
            put(name, tensor)
        missing = set(refitter.get_missing_weights())
        if missing:
            for name, tensor in complete(missing).items():
                put(name, tensor)
            missing = set(refitter.get_missing_weights())
            if missing:
                raise BackendUnavailable(f"TensorRT refit still misses {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        with torch.cuda.device(self.device):
            ok = refitter.refit_cuda_engine()
        if not ok:
            raise BackendUnavailable("TensorRT refit failed (see the TensorRT errors in the log)")
        return len(held)

    def release(self) -> None:
        """Frees the engine's device memory now (ComfyUI unloaded it)."""
        self.context = None
        self.engine = None
        self.runtime = None


def profiles_of_engine(engine, input_names: Sequence[str]) -> list[EngineProfile]:
    """Reads the profiles of an engine built elsewhere (names x / context as the export uses)."""
    from .profiles import LATENT_SCALE, Range

    out = []
    for index in range(engine.num_optimization_profiles):
        x = [tuple(s) for s in engine.get_tensor_profile_shape("x", index)]
        c = [tuple(s) for s in engine.get_tensor_profile_shape("context", index)] if "context" in input_names else None
        out.append(EngineProfile(batch=Range(x[0][0], x[1][0], x[2][0]),
                                 height=Range(*(s[2] * LATENT_SCALE for s in x)),
                                 width=Range(*(s[3] * LATENT_SCALE for s in x)),
                                 tokens=Range(*(s[1] for s in c)) if c else Range(0, 0, 0)))
    return out
