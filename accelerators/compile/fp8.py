"""`precision="fp8"`: the compiled model's linear layers run as fp8 GEMMs with row-wise scales.

What runs: weights and activations in float8 e4m3 (finite range ±448), each weight scaled per output channel
(one scale per row of W) and each activation per token row, the GEMM `torch._scaled_mm(x8, W8ᵀ, scale_x,
scale_w)` with a bf16 (or the model's float) output, the bias added after. Row-wise scales keep one large row (a
token with outlier features, one output channel with large weights) from crushing the resolution of all the
others, which per-tensor scales (ComfyUI's `fp8_e4m3fn_fast` loader dtype) cannot.

Why `torch._scaled_mm` directly and not torchao's float8 dynamic quantization: it is in torch itself (no new
dependency, nothing to grey out but the GPU and torch version), it is a plain aten op that dynamo traces with
`fullgraph=True` and inductor lowers (the activation quantization fuses into one kernel before it), and its
inputs are tensors we own, so CUDA graphs and our in-place re-quantization keep their addresses. torchao would
add the same kernel behind tensor subclasses that swap the weights of the module itself: a lasting change to
a diffusion model every ComfyUI clone shares, which is what this lane never does.

How it reaches only our calls: per routed Linear, an fp8 copy of its weight and its scales (`fp8_store.Fp8Store`,
routed by each session's `Fp8Weights`); while one of our apply_model calls runs compiled or captures a graph (`Fp8Weights.routed`),
each of those Linears is replaced in its parent by an `Fp8Linear` stand-in that holds the original Linear (its
live bias) and those buffers, and is put back afterwards: the same swap-for-one-call as the block stand-ins
(dit.py). Other clones of the model, and our own eager fallbacks, run the model's dtype.

LoRA: the fp8 copies are made from the live, patched weights. Once per sampling run (`graphs.OncePerRun`) the
session compares what the host says is patched into the weights (ComfyUI: the base model's
`current_weight_patches_uuid` and the running patcher's patch keys; the WebUI's LoRA: each layer's
`network_current_names`) and where each weight lives; the layers that changed are quantized again *into the
same buffers* (`copy_`), so compiled code and captured graphs keep reading the same addresses: no recompile, no
re-capture. ComfyUI's hook LoRAs (a LoRA per conditioning, patched between the calls of one step) are followed
through the host's `ON_APPLY_HOOKS` callback: the layers they patch or restore are quantized again at once. (A tensor's `_version` cannot serve: ComfyUI patches with `param.data.copy_`, which the version
counter of the Parameter does not see.)

Memory (fp8_store.py): the copies (about half the Linear weights' bytes) live beside the model's own weights; one
set per diffusion model, shared by its sessions, freed with the last clone carrying one or when ComfyUI unloads
the model, made again on the next run. ComfyUI's memory manager is told: the copies are a model of their own to
it (a weightless holder loaded with the model, sized as the copies, counted once per set), which it can unload to
make room (the copies and graphs freed); before new copies are made it is asked for room (the WebUI has none).

Which layers stay in the model's dtype: KEEP, one list per family (why each entry: docs/benchmarks.md, "fp8
layer errors"), and every Linear whose sizes `_scaled_mm` cannot take (in or out features not a multiple of 16)
or that ComfyUI computes its own way this run (weights cast per call: lowvram offload, fp8 storage).
"""
from __future__ import annotations

import contextlib
import re
import weakref
from typing import Callable

from ..base import Availability
from .graphs import OncePerRun

FP8_MAX = 448.0          # the largest finite float8 e4m3fn value
MIN_SCALE = 1e-12        # an all-zero row gets this scale (its fp8 values are all zero anyway)
ALIGN = 16               # _scaled_mm needs the GEMM's K and N to be multiples of 16
FAST_ACCUM = True        # CUDA: the fp8 tensor cores' fast accumulation (torchao's inference default)

# Layers kept in the model's dtype, by name (a regular expression searched in the layer's name inside the
# diffusion model), one list per family. In every family: the first and last layers (patch/latent embedding,
# final projection), the embeddings of time, guidance and pooled text (M = batch: nothing to gain, and their
# error shifts every token), and the modulation layers (adaLN: their output scales and shifts every token of a
# block, so their error is amplified; M = batch again). Norms have no Linear.
KEEP = {
    # SD1.x/2.x/SDXL UNets, compiled whole: time and class (ADM) embeddings and each residual block's
    # time-embedding projection (M = batch), and each spatial transformer's proj_in/proj_out (Linear in SDXL:
    # the entry and exit of its residual stream, the most sensitive layers measured, ~1% of its GEMM work). The
    # UNet's first and last layers are convolutions, which stay as they are. And the attention projections
    # (q, k, v, out; 420 of SDXL's 500 GEMMs a call): at the UNets' widths (320-1280) the fp8 GEMM is no faster
    # than fp16 even bare, quantization aside (SDXL 1024²: 20.8 ms a call in fp16, 19.8 in fp8 for all the
    # transformer Linears, all of the gain in the feed-forwards; `tools.probe_fp8_gemm --model sdxl`), so fp8
    # there only adds error.
    "sd-unet": (r"^time_embed\.", r"^label_emb\.", r"\.emb_layers\.", r"(^|\.)proj_(in|out)$",
                r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    # Flux, Flux2, Chroma (and HunyuanVideo, whose names are Flux's): inputs, outputs, embeddings, modulation
    "flux": (r"^(img_in|txt_in|time_in|vector_in|guidance_in|final_layer|distilled_guidance_layer)\b",
             r"(^|\.)(img_mod|txt_mod|modulation|double_stream_modulation_img|double_stream_modulation_txt|"
             r"single_stream_modulation)\b", r"(^|\.)(byt5_in|vision_in|txt_in)\b"),
    # every other DiT (SD3, Qwen-Image, Lumina2/Z-Image, HiDream, Wan, LTXV, ...), by name patterns
    "dit": (r"(^|\.|_)(x_embedder|patch_embed|patch_embedding|img_in|txt_in|context_embedder|cap_embedder|"
            r"caption_projection|text_embedding|time_embedding|time_projection|t_embedder|y_embedder|"
            r"time_text_embed|adaln_single|pos_embed|final_layer|norm_out|proj_out|head|out_layer)\b",
            r"(ada_?ln|adaLN|modulation|_mod\b|\.mod\b|norm)"),
}
FLUX_CLASSES = ("Flux", "Flux2", "Chroma", "ChromaRadiance", "HunyuanVideo")


def keep_patterns(model_class: str) -> tuple:
    family = "sd-unet" if model_class == "UNetModel" else "flux" if model_class in FLUX_CLASSES else "dit"
    return tuple(re.compile(p) for p in KEEP[family])


# ---- the arithmetic -------------------------------------------------------------------------------------------
def quantize_rows(t):
    """(t in e4m3, float32 scales of shape [rows, 1]): each row of the 2-D `t` scaled so its largest magnitude
    maps to ±448 (`to_e4m3` saturates what rounding pushes beyond)."""
    wide = t.float()
    scale = wide.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_SCALE * FP8_MAX) / FP8_MAX
    return to_e4m3(wide / scale), scale


def to_e4m3(t):
    """`t` (already scaled) in e4m3, saturating at ±448. Explicitly: e4m3fn has no infinity, and what a cast
    does beyond its range is the kernel's choice (this torch's CPU cast saturates; the format allows NaN)."""
    import torch

    return t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_linear(x, weight_fp8, weight_scale, bias):
    """x @ Wᵀ + b with x quantized per token row and W per output channel (weight_scale: [1, out]). The bias is
    added in the GEMM's epilogue (no separate pass over the output), and the tensor cores accumulate with
    `use_fast_accum` on CUDA, as torchao's float8 inference does by default."""
    import torch

    rows = x.reshape(-1, x.shape[-1])
    x8, x_scale = quantize_rows(rows)
    # row-wise scaling on CUDA writes bf16 only; the model's own float type elsewhere (the CPU kernel takes it)
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    out = torch._scaled_mm(x8, weight_fp8.t(), scale_a=x_scale, scale_b=weight_scale,
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                           use_fast_accum=FAST_ACCUM and x.is_cuda)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight_fp8.shape[0])


# ---- where it can run -----------------------------------------------------------------------------------------
def available(device=None) -> Availability:
    """Whether fp8 GEMMs with row-wise scales run on `device` (default: the current CUDA device), with a reason a
    user can act on."""
    try:
        import torch
    except Exception as exc:
        return Availability(False, f"torch unavailable: {exc}")
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return Availability(False, f"torch {torch.__version__} has no fp8 matrix multiply (torch._scaled_mm); "
                                   f"fp8 needs torch 2.5 or newer")
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+: "
                                       "Ada, Hopper, Blackwell); torch sees no CUDA GPU here")
        if device is not None:
            return Availability(False, f"the model runs on {device}, not a CUDA GPU: fp8 needs one with fp8 "
                                       f"tensor cores (compute capability 8.9+)")
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _probed:
        _probed[key] = _probe(torch, device)
    return _probed[key]


_probed: dict = {}   # CUDA device → its Availability (one probe per process)


def _probe(torch, device) -> Availability:
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        return Availability(False, f"{name} (compute capability {major}.{minor}) has no fp8 tensor cores; fp8 "
                                   f"needs 8.9+ (Ada, Hopper, Blackwell): use precision auto")
    try:   # row-wise scales (with a bias, fast accumulation) need a recent torch on this GPU: ask the kernel
        w8, w_scale = quantize_rows(torch.ones(16, 32, device=device))
        fp8_linear(torch.ones(3, 32, device=device, dtype=torch.bfloat16), w8, w_scale.reshape(1, -1),
                   torch.zeros(16, device=device, dtype=torch.bfloat16))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return Availability(False, f"torch {torch.__version__}'s _scaled_mm has no row-wise scaling on {name} "
                                   f"({first}); upgrade torch (2.5+)")
    return Availability(True, f"fp8 e4m3 GEMMs with row-wise scales on {name}")


def precision_in_effect(parsed, device, torch_compile: bool):
    """`parsed` (session.CompileOptions) if fp8 GEMMs run on `device` (`available`) under this backend
    (torch.compile's: the routing happens per call, which a traced or ahead-of-time backend would bake), else the
    model's dtype with one warning saying why, or BackendUnavailable under the `error` policy."""
    import dataclasses

    from .. import events
    from ..base import BackendUnavailable

    ready = available(device) if torch_compile else \
        Availability(False, f"{parsed.backend} runs no fp8 layers (inductor and inductor+cudagraphs do)")
    if ready:
        return parsed
    if parsed.fallback == "error":
        raise BackendUnavailable(f"precision fp8: {ready.reason}")
    events.notice("fp8", f"precision fp8: {ready.reason}; running in the model's dtype", node_id=parsed.node_id)
    return dataclasses.replace(parsed, precision="auto")


# ---- the layers, their fp8 copies and the routing -------------------------------------------------------------
def _stand_in_class():
    import torch

    class Fp8Linear(torch.nn.Module):
        """Stands in for one Linear during one of our calls: its GEMM in fp8 from the session's buffers."""

        def __init__(self, linear, weight_fp8, weight_scale):
            super().__init__()
            self.linear = linear   # a submodule for the call: its live bias is lifted like any parameter
            self.register_buffer("weight_fp8", weight_fp8, persistent=False)
            self.register_buffer("weight_scale", weight_scale, persistent=False)

        # what model code reads of a Linear (its weight's dtype, its sizes) still answers
        @property
        def weight(self):
            return self.linear.weight

        @property
        def in_features(self) -> int:
            return self.linear.in_features

        @property
        def out_features(self) -> int:
            return self.linear.out_features

        def forward(self, x, *args, **kwargs):
            return fp8_linear(x, self.weight_fp8, self.weight_scale, self.linear.bias)

    return Fp8Linear


_fp8_linear_class = None


def stand_in_class():
    global _fp8_linear_class
    if _fp8_linear_class is None:
        _fp8_linear_class = _stand_in_class()
    return _fp8_linear_class


def candidate_layers(diffusion_model, served) -> list[tuple[str, object]]:
    """(name, Linear) of every layer fp8 may route: inside the repeated blocks (DiTs compiled block by block) or
    the whole model, minus the family's KEEP list and the sizes _scaled_mm cannot take."""
    import torch

    if served is not None and served.blocks:
        roots = [(name, getattr(diffusion_model, name)) for name, _, _ in served.blocks]
    else:
        roots = [("", diffusion_model)]
    keep = keep_patterns(type(diffusion_model).__name__)
    found = []
    for prefix, root in roots:
        for sub, module in root.named_modules():
            name = f"{prefix}.{sub}" if prefix and sub else prefix or sub
            if not isinstance(module, torch.nn.Linear) or any(p.search(name) for p in keep):
                continue
            if module.in_features % ALIGN or module.out_features % ALIGN:
                continue
            found.append((name, module))
    return found


def runs_plain(linear, device) -> bool:
    """The Linear computes from its own weight this run (not cast per call by ComfyUI: lowvram offload with
    LoRA patches applied on the fly, fp8 storage), on the device the model runs on."""
    weight = linear.weight
    return (not getattr(linear, "comfy_cast_weights", False) and not getattr(linear, "weight_function", None)
            and not getattr(linear, "bias_function", None) and weight.is_floating_point()
            and weight.element_size() >= 2 and weight.device.type == device.type
            and (device.index is None or weight.device.index == device.index))


class Fp8Weights:
    """One session's view of the fp8 copies (fp8_store.py: one set per diffusion model, shared by its sessions):
    which layers this session routes, brought up to date once per run, and what ran."""

    def __init__(self, session, device):
        import torch

        self._session = _weak(session)   # no reference back: the session is freed with its last clone
        self.device = torch.device(device)
        self.store = None                # fp8_store.Fp8Store, from the first run on
        self.names: dict = {}            # routed layer name → weak ref of its stand-in at the last refresh
        self.per_run = OncePerRun()
        self.calls = 0                   # our calls that ran with fp8 layers (compiled, captured or replayed)
        self.requantized = 0             # layers quantized again after a weight change (LoRA), all runs
        self.why_not = ""                # why no layer runs in fp8 now ('' when some do)

    @property
    def session(self):
        return self._session()

    @property
    def active(self) -> bool:
        return bool(self.names)

    @property
    def routes(self) -> dict:
        """name → fp8_store.Routed of the layers this session routes."""
        routes = self.store.routes if self.store is not None else {}
        return {n: routes[n] for n in self.names if n in routes}

    @routes.setter
    def routes(self, routes: dict) -> None:   # a subset to route (tools/fp8_layer_error.py)
        self.names = {n: weakref.ref(r.stand_in) for n, r in routes.items()}

    # -- once per sampling run --------------------------------------------------------------------------------
    def refresh(self, base_model, diffusion_model, transformer_options: dict) -> None:
        """First call of a run: route the eligible layers, quantize new ones, re-quantize the changed ones."""
        if not self.per_run.first(transformer_options):
            return
        import torch

        with torch.inference_mode(False), torch.no_grad():   # our buffers must stay normal tensors
            self._refresh(base_model, diffusion_model)

    def adopt(self, diffusion_model):
        """The set of fp8 copies of `diffusion_model` this session routes (fp8_store.store_for: shared)."""
        from .fp8_store import store_for

        store = store_for(diffusion_model, self.device)
        if store is not self.store:
            self.store, self.names = store, {}
            store.users.add(self)
        return store

    def _refresh(self, base_model, diffusion_model) -> None:
        session = self.session
        store = self.adopt(diffusion_model)
        candidates = candidate_layers(diffusion_model, session.served)
        eligible = [(n, m) for n, m in candidates if runs_plain(m, self.device)]
        changed = store.update(base_model, candidates, eligible)
        names = {n: weakref.ref(store.routes[n].stand_in) for n, _ in eligible}
        if self.names and (names.keys() != self.names.keys()
                           or any(names[n]() is not s() for n, s in self.names.items() if n in names)):
            # a layer joins or leaves the routing (lowvram, another loading), or its copy was made again: the
            # graphs read the old buffers
            self._release_graphs()
        self.names = names
        self.requantized += changed
        if changed:
            session.notice(f"fp8: {changed} layer(s) quantized again from the patched weights (LoRA change; no "
                           f"recompile)", level="info")
        self.why_not = "" if self.names else ("no linear layer of this model can run in fp8 this run (all kept, "
                                              "misaligned, or cast per call by ComfyUI: lowvram or fp8 storage)")

    def hooks_applied(self, patcher) -> None:
        """ComfyUI applied (or removed) hook patches between two calls (its ON_APPLY_HOOKS callback): the layers
        they patched before or patch now are quantized again, in place, before the next call."""
        import torch

        if self.store is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            self.requantized += self.store.hooks_applied(patcher)

    # -- per call -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def routed(self):
        """For the duration of the block: every routed Linear replaced in its parent by its fp8 stand-in."""
        swapped = []
        try:
            for route in self.routes.values():
                modules = route.parent._modules
                if modules.get(route.attr) is route.linear:
                    modules[route.attr] = route.stand_in
                    swapped.append(route)
            if swapped:
                self.calls += 1
            yield
        finally:
            for route in swapped:
                route.parent._modules[route.attr] = route.linear

    def count_replay(self) -> None:
        if self.names:
            self.calls += 1

    def release(self) -> None:
        """ComfyUI unloads the model: free the fp8 copies, this session's and every other's on the same model
        (made again from the weights on the next run)."""
        freed = self.store.release() if self.store is not None else 0
        self.forget()
        self.say_freed(freed)

    def say_freed(self, freed: int) -> bool:
        if not freed or self.session is None:
            return False
        self.session.notice(f"model unloaded: freed the fp8 copies, {freed / 2**20:.0f} MiB", level="info")
        return True

    def forget(self) -> None:
        """The copies were freed (fp8_store.Fp8Store.release): route nothing until the next run makes them."""
        if self.names:
            self._release_graphs()
        self.names = {}
        self.per_run = OncePerRun()

    def _release_graphs(self) -> None:
        graphs = getattr(self.session, "graphs", None)
        if graphs is not None:
            graphs.release()


def _weak(obj):
    """A weak reference to `obj` where it takes one (a plain namespace does not: held as it is)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def routing(session) -> Callable:
    """A context for one compiled call of `session`: fp8 routing when the session runs fp8, else nothing."""
    fp8 = getattr(session, "fp8", None)
    return fp8.routed() if fp8 is not None else contextlib.nullcontext()
