"""The stacks the two benches run, each named once: what the name builds, its title and its flags.

`UNET_STACKS` are tools/bench.py's (SD UNets), `DIT_STACKS` tools/bench_dit.py's (DiTs); the facts both use (the
forced Step Cache schedule `step-cache-2`, ComfyUI's TorchCompileModel path, why a stack needs a GPU, the bf16 twin
an fp8 stack is also compared with) are written here once. A build takes the base ModelPatcher and the bench's
context dict (`store`: the artifact cache; `easycache_threshold`: core EasyCache's) and returns the patched clone.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# why a GPU-only stack is skipped on a CPU (the bench's row says it)
NEEDS_CUDA = "needs a CUDA GPU"
NEEDS_CUDA_GRAPHS = "CUDA graphs need a CUDA GPU"
NEEDS_FP8_GEMMS = "fp8 GEMMs need a CUDA GPU with fp8 tensor cores"
ON_CUDA = ("cuda",)   # a stack's default_on when only a GPU runs it unasked


@dataclass(frozen=True)
class Stack:
    name: str
    title: str
    build: Callable  # (base ModelPatcher, context dict) -> patched ModelPatcher
    requires: tuple = ()  # registry names that must be available
    lossless: bool = True
    gpu_only: str = ""  # why it cannot run without a CUDA GPU ("": it can)
    default_on: tuple = ("cpu", "cuda")  # where it runs when --stacks is not given
    vae: str = "full"  # the decoder its timed runs use under --decode: the full KL VAE or the Tiny VAE ("taesd")
    fp8_twin: str = ""  # an fp8 stack: the bf16 stack its latent is also compared with


def stack_named(stacks, name: str) -> Stack | None:
    return next((stack for stack in stacks if stack.name == name), None)


def default_stacks(stacks, cuda: bool) -> list[str]:
    where = "cuda" if cuda else "cpu"
    return [stack.name for stack in stacks if where in stack.default_on]


# `step-cache-2`, the forced schedule: a full step every 2nd step up to 95% (9 of 20 skipped), so the speed shows
# even where random weights give the adaptive rule nothing to skip; the row says what was skipped
STEP_CACHE_2 = {"cache_mode": "interval", "interval": 2, "start": 0.0, "end": 0.95}
EASYCACHE_THRESHOLD = 0.2   # core EasyCache's default; bench_dit's --easycache-threshold moves it
EASYCACHE_WINDOW = (0.15, 0.95)   # core EasyCache's start and end percent, also step-cache-adaptive's window


def forced_skips(steps: int) -> int:
    """How many steps `step-cache-2` skips: every 2nd step, before 95% of the run (9 of 20)."""
    return sum(1 for i in range(steps) if i % STEP_CACHE_2["interval"] != 0 and i < STEP_CACHE_2["end"] * steps)


def backend(name: str, **options):
    """A compile backend of the registry as the node applies it (fallback error), with the bench's artifact cache."""
    def build(model, ctx):
        from comfy_accel.accelerators import registry

        return registry.get(name).apply(model, {"fallback": "error", "node_id": None, "store": ctx.get("store"),
                                                **options})
    return build


def accelerate_model(backend_name: str, scope: str = "auto", precision: str = "auto", mode: str = "default"):
    """The Accelerate Model node's own function (DiTs: block by block unless scope whole); prints what compiles."""
    def build(model, ctx):
        from comfy_accel.accelerators.accelerate import accelerate

        out, in_effect = accelerate(model, backend=backend_name, fallback="error", scope=scope, precision=precision,
                                    mode=mode)
        print(f"[bench_dit] Accelerate Model ({backend_name}) compiles {in_effect.get('compiles')}", flush=True)
        return out
    return build


def accelerator(name: str, **config):
    def build(model, ctx):
        from comfy_accel.accelerators import registry

        spec = registry.get(name)
        return spec.apply(model, spec.config(**config))
    return build


def chain(*builders):
    """The builders applied in order: the first one's patch is innermost."""
    def build(model, ctx):
        for builder in builders:
            model = builder(model, ctx)
        return model
    return build


def comfy_compile(mode: str | None = None):
    """ComfyUI's own TorchCompileModel node path (inductor, the whole diffusion model), the baseline users know."""
    def build(model, ctx):
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        clone = model.clone()
        set_torch_compile_wrapper(clone, backend="inductor", mode=mode)
        return clone
    return build


def keep_weights_on_gpu(model, ctx):
    """The node's keep_weights_on_gpu option (a LoRA change then reloads nothing)."""
    from comfy_accel.accelerators.accelerate import keep_on_load_device

    keep_on_load_device(model)
    return model


def fp8_weights(model, ctx):
    """The base UNet's weights loaded again by ComfyUI's UNETLoader with weight_dtype fp8_e4m3fn_fast (the user's
    way to fp8: fp8 weights, and fp8 matrix multiplies on GPUs that support them, e.g. Hopper)."""
    from tools.model_factory import load_unet_as

    if "fp8_model" not in ctx:
        ctx["fp8_model"] = load_unet_as(model, "fp8_e4m3fn_fast", Path(tempfile.mkdtemp(prefix="accel_fp8_")))
    return ctx["fp8_model"].clone()


def step_cache_adaptive(model, ctx):
    """Step Cache's adaptive rule at core EasyCache's threshold and window: the like-for-like of comfy-easycache."""
    start, end = EASYCACHE_WINDOW
    threshold = ctx.get("easycache_threshold", EASYCACHE_THRESHOLD)
    return accelerator("step_cache", cache_mode="adaptive", threshold=threshold, start=start, end=end)(model, ctx)


def core_easycache(model, ctx):
    """ComfyUI's own EasyCache node (its defaults but the threshold), the step cache users reach for today."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    start, end = EASYCACHE_WINDOW
    return EasyCacheNode.execute(model, reuse_threshold=ctx.get("easycache_threshold", EASYCACHE_THRESHOLD),
                                 start_percent=start, end_percent=end, verbose=False).result[0]


def _eager(model, ctx):
    return model


_step_cache_2 = accelerator("step_cache", **STEP_CACHE_2)
_cutoff_50 = accelerator("cfg_cutoff", cutoff_percent=50.0)
_deepcache_3 = accelerator("deepcache", cache_interval=3)
_graphs = backend("inductor+cudagraphs")
_FASTEST = chain(_cutoff_50, _deepcache_3, _graphs)
_GRAPHS = ("inductor+cudagraphs",)
_FASTEST_REQUIRES = ("cfg_cutoff", "deepcache", "inductor+cudagraphs")
_SC_GRAPHS_REQUIRES = ("cfg_cutoff", "step_cache", "inductor+cudagraphs")

UNET_STACKS = [
    Stack("eager", "ComfyUI eager (baseline)", _eager),
    # compile stacks cost minutes on CPU for no gain: only when asked for there
    Stack("comfy-compile", "ComfyUI TorchCompileModel (inductor)", comfy_compile(), default_on=ON_CUDA),
    Stack("comfy-compile-cg", "ComfyUI TorchCompileModel, reduce-overhead", comfy_compile("reduce-overhead"),
          gpu_only=NEEDS_CUDA),
    Stack("inductor", "Accelerate Model: inductor", backend("inductor"), requires=("inductor",), default_on=ON_CUDA),
    Stack("inductor+cudagraphs", "Accelerate Model: inductor+cudagraphs", _graphs, requires=_GRAPHS,
          gpu_only=NEEDS_CUDA),
    Stack("inductor+cudagraphs+keep", "Accelerate Model: inductor+cudagraphs, keep_weights_on_gpu",
          chain(_graphs, keep_weights_on_gpu), requires=_GRAPHS, gpu_only=NEEDS_CUDA),
    # "fp8", "fp8+inductor+cudagraphs": ComfyUI's own loader fp8 (per-tensor scales); "fp8-rowwise+...": ours,
    # Accelerate Model's precision fp8 (row-wise scales on weights and activations, accelerators/compile/fp8.py);
    # each also compared with the bf16 compiled stack
    Stack("fp8", "ComfyUI loader fp8: UNETLoader fp8_e4m3fn_fast weights, eager", fp8_weights, lossless=False,
          default_on=ON_CUDA, fp8_twin="inductor+cudagraphs"),
    Stack("fp8+inductor+cudagraphs", "ComfyUI loader fp8 (UNETLoader fp8_e4m3fn_fast) + Accelerate Model: "
          "inductor+cudagraphs", chain(fp8_weights, _graphs), requires=_GRAPHS, lossless=False, gpu_only=NEEDS_CUDA,
          fp8_twin="inductor+cudagraphs"),
    Stack("fp8-rowwise+inductor+cudagraphs", "Accelerate Model: inductor+cudagraphs, precision fp8 (row-wise)",
          backend("inductor+cudagraphs", precision="fp8"), requires=_GRAPHS, lossless=False, gpu_only=NEEDS_CUDA,
          fp8_twin="inductor+cudagraphs"),
    Stack("stable-fast", "Accelerate Model: stable-fast", backend("stable-fast"), requires=("stable-fast",)),
    Stack("stable-fast-max", "Accelerate Model: stable-fast, max-autotune (fp16-accumulating GEMMs)",
          backend("stable-fast", mode="max-autotune"), requires=("stable-fast",), lossless=False),
    Stack("onediff", "Accelerate Model: onediff", backend("onediff"), requires=("onediff",)),
    Stack("tensorrt", "Accelerate Model: tensorrt", backend("tensorrt"), requires=("tensorrt",)),
    Stack("cfg-cutoff-50", "CFG cutoff at 50%", _cutoff_50, requires=("cfg_cutoff",), lossless=False),
    Stack("deepcache-3", "DeepCache interval 3", _deepcache_3, requires=("deepcache",), lossless=False),
    Stack("step-cache-2", "Step Cache, interval 2", _step_cache_2, requires=("step_cache",), lossless=False),
    Stack("compile+step-cache-2", "inductor+cudagraphs + Step Cache interval 2", chain(_step_cache_2, _graphs),
          requires=("step_cache", "inductor+cudagraphs"), lossless=False, gpu_only=NEEDS_CUDA),
    Stack("compile+step-cache-2+cutoff-50", "inductor+cudagraphs + Step Cache interval 2 + CFG cutoff 50%",
          chain(_cutoff_50, _step_cache_2, _graphs), requires=_SC_GRAPHS_REQUIRES, lossless=False,
          gpu_only=NEEDS_CUDA),
    Stack("compile+deepcache-3", "inductor+cudagraphs + DeepCache 3", chain(_deepcache_3, _graphs),
          requires=("deepcache", "inductor+cudagraphs"), lossless=False, gpu_only=NEEDS_CUDA),
    Stack("compile+cutoff-50", "inductor+cudagraphs + CFG cutoff 50%", chain(_cutoff_50, _graphs),
          requires=("cfg_cutoff", "inductor+cudagraphs"), lossless=False, gpu_only=NEEDS_CUDA),
    Stack("fastest", "inductor+cudagraphs + DeepCache 3 + CFG cutoff 50%", _FASTEST, requires=_FASTEST_REQUIRES,
          lossless=False, gpu_only=NEEDS_CUDA),
    Stack("fastest+taesd", "inductor+cudagraphs + DeepCache 3 + CFG cutoff 50% + Tiny VAE decode", _FASTEST,
          requires=(*_FASTEST_REQUIRES, "taesd"), lossless=False, gpu_only=NEEDS_CUDA, vae="taesd"),
    # the same with Step Cache in DeepCache's place: whole UNet calls skipped instead of its deep blocks
    Stack("fastest-step-cache+taesd", "inductor+cudagraphs + Step Cache interval 2 + CFG cutoff 50% + Tiny VAE "
          "decode", chain(_cutoff_50, _step_cache_2, _graphs), requires=(*_SC_GRAPHS_REQUIRES, "taesd"),
          lossless=False, gpu_only=NEEDS_CUDA, vae="taesd"),
]

# DiTs: Accelerate Model compiles block by block (`inductor-whole`: the whole model, minutes cold, so opt-in as the
# max-autotune stacks are); on a CPU only eager and inductor run unasked
_dit_inductor = accelerate_model("inductor")
_dit_graphs = accelerate_model("inductor+cudagraphs")
_dit_max_autotune = accelerate_model("inductor+cudagraphs", mode="max-autotune")
_dit_fp8_graphs = accelerate_model("inductor+cudagraphs", precision="fp8")

DIT_STACKS = [
    Stack("eager", "ComfyUI eager (baseline)", _eager),
    Stack("comfy-compile", "ComfyUI TorchCompileModel (inductor)", comfy_compile(), default_on=ON_CUDA),
    Stack("inductor", "Accelerate Model: inductor", _dit_inductor),
    Stack("inductor+cudagraphs", "Accelerate Model: inductor+cudagraphs", _dit_graphs, gpu_only=NEEDS_CUDA_GRAPHS,
          default_on=ON_CUDA),
    Stack("inductor-whole", "Accelerate Model: inductor, scope whole", accelerate_model("inductor", scope="whole"),
          default_on=()),
    Stack("step-cache-2", "Step Cache, interval 2", _step_cache_2, lossless=False, default_on=ON_CUDA),
    Stack("inductor+step-cache-2", "Accelerate Model: inductor + Step Cache interval 2",
          chain(_step_cache_2, _dit_inductor), lossless=False, default_on=ON_CUDA),
    Stack("inductor+cudagraphs+step-cache-2", "Accelerate Model: inductor+cudagraphs + Step Cache interval 2",
          chain(_step_cache_2, _dit_graphs), lossless=False, gpu_only=NEEDS_CUDA_GRAPHS, default_on=ON_CUDA),
    Stack("step-cache-adaptive", "Step Cache adaptive at core EasyCache's threshold", step_cache_adaptive,
          lossless=False, default_on=ON_CUDA),
    Stack("inductor+cudagraphs+step-cache-adaptive", "Accelerate Model: inductor+cudagraphs + Step Cache adaptive",
          chain(step_cache_adaptive, _dit_graphs), lossless=False, gpu_only=NEEDS_CUDA_GRAPHS, default_on=ON_CUDA),
    Stack("comfy-easycache", "ComfyUI EasyCache", core_easycache, lossless=False, default_on=ON_CUDA),
    Stack("comfy-compile+easycache", "ComfyUI TorchCompileModel + EasyCache", chain(core_easycache, comfy_compile()),
          lossless=False, default_on=ON_CUDA),
    Stack("fp8+inductor", "Accelerate Model: inductor, precision fp8", accelerate_model("inductor", precision="fp8"),
          lossless=False, gpu_only=NEEDS_FP8_GEMMS, default_on=ON_CUDA, fp8_twin="inductor"),
    Stack("fp8+inductor+cudagraphs", "Accelerate Model: inductor+cudagraphs, precision fp8", _dit_fp8_graphs,
          lossless=False, gpu_only=NEEDS_FP8_GEMMS, default_on=ON_CUDA, fp8_twin="inductor+cudagraphs"),
    Stack("fp8+inductor+cudagraphs+step-cache-2", "Accelerate Model: inductor+cudagraphs, precision fp8 + Step "
          "Cache interval 2", chain(_step_cache_2, _dit_fp8_graphs), lossless=False, gpu_only=NEEDS_FP8_GEMMS,
          default_on=ON_CUDA, fp8_twin="inductor+cudagraphs+step-cache-2"),
    # Accelerate Model's mode max-autotune: inductor benchmarks GEMM templates against cuBLAS per shape
    Stack("max-autotune+inductor+cudagraphs", "Accelerate Model: inductor+cudagraphs, max-autotune",
          _dit_max_autotune, gpu_only=NEEDS_CUDA_GRAPHS, default_on=()),
    Stack("fp8+max-autotune+inductor+cudagraphs", "Accelerate Model: inductor+cudagraphs, max-autotune, precision "
          "fp8", accelerate_model("inductor+cudagraphs", precision="fp8", mode="max-autotune"), lossless=False,
          gpu_only=NEEDS_FP8_GEMMS, default_on=(), fp8_twin="max-autotune+inductor+cudagraphs"),
]


def stack_availability(stack: Stack, cuda: bool, decode: bool = True) -> tuple[bool, str]:
    """(can run here, why not): a GPU, --decode for a stack whose gain is in the decode, its accelerators."""
    if stack.gpu_only and not cuda:
        return False, stack.gpu_only
    if stack.vae != "full" and not decode:
        return False, "its gain is in the decode: add --decode (times sampling + VAE decode)"
    from comfy_accel.accelerators import registry

    for name in stack.requires:
        try:
            availability = registry.get(name).available()
        except KeyError as exc:
            return False, str(exc).strip("'\"")
        if not availability.ok:
            return False, f"{name}: {availability.reason}"
    return True, ""
