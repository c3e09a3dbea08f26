"""The UNet of an `ldm`/`sgm` UNetModel (what the AUTOMATIC1111 WebUI runs) through DeepCache and the compile lane.

Host-agnostic: the WebUI shim (scripts/comfy_accel_webui.py) hands in the UNet module, the host's own unpatched
forward and its `timestep_embedding`/`cat` (A1111 hijacks both), and tells the runner which denoiser call of a
sampling pass is next (`begin_call`, from the WebUI's `on_cfg_denoiser` callback). Nothing here imports the WebUI.

- DeepCache: `LdmBlockWalk` re-walks `UNetModel.forward` (time embedding → input_blocks → middle_block →
  output_blocks → out), cut at skip branch k into three segments: `shallow_in` (input blocks 0..k), `deep` (the
  rest of the input blocks, the middle block and output blocks 0..N-k-2 → the feature entering block N-k-1) and
  `shallow_out`. A full call runs all three and keeps the feature; the next `interval - 1` calls run only the
  shallow segments on it. A1111 puts the cond rows first and drops the uncond rows at the end of the batch when it
  skips the uncond (NGMS, the pack's CFG cutoff), so a smaller batch reuses the first rows of a cached feature.
- The compile lane: the same `CompileSession` as ComfyUI (compile/session.py: shape buckets, compile events, the
  artifact cache keyed by `ArtifactKey`, CUDA graphs through its segment compiler). The whole UNet is one
  segment named `webui.unet`; under DeepCache the three segments are compiled each once per shape.
- LoRA: A1111 patches the weights in place (`network_apply_weights`), so compiled code reads them as they are.

`counts` records what ran (calls, full/shallow/eager/compiled, the batch of each call); the shim turns it into the
infotext, so the image says what ran and never only what was asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import events
from .compile.session import CompileSession, bucket_of, describe_bucket

WHOLE_UNET = "webui.unet"
WEBUI_CACHE_LIMIT = 64   # dynamo entries per code object: SDXL's ~30 blocks × batch 2 and 1


@dataclass
class RunCounts:
    calls: int = 0
    full: int = 0          # DeepCache: calls that ran every block
    shallow: int = 0       # DeepCache: calls that reused the deep feature
    compiled: int = 0      # calls whose UNet (or segments) ran compiled
    eager: int = 0         # calls that ran the host's eager UNet
    batches: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "full": self.full, "shallow": self.shallow, "compiled": self.compiled,
                "eager": self.eager, "batches": list(self.batches)}


class LdmBlockWalk:
    """`ldm`/`sgm` UNetModel.forward in three segment functions, cut at skip branch `branch`."""

    def __init__(self, unet, branch: int, timestep_embedding: Callable, cat: Callable):
        n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
        if n_in != n_out or getattr(unet, "predict_codebook_ids", False):
            raise ValueError(f"UNet differs from the block loop DeepCache walks ({n_in} input blocks, {n_out} "
                             f"output blocks, predict_codebook_ids={getattr(unet, 'predict_codebook_ids', None)})")
        if not 0 <= branch < max(n_in - 1, 1):
            raise ValueError(f"cache branch {branch} is outside this UNet's 0..{n_in - 2}")
        self.unet, self.branch = unet, branch
        self.timestep_embedding, self.cat = timestep_embedding, cat
        self.split = n_out - 1 - branch     # first output block of the shallow path
        self.names = tuple(f"deepcache.b{branch}.{part}" for part in ("shallow_in", "deep", "shallow_out"))

    def time_embedding(self, timesteps):
        """The host's sinusoidal embedding, run outside compiled code: A1111 wraps it in a `CondFunc` hijack that
        torch 2.1's dynamo cannot trace (a graph break that split every block into a compile of its own)."""
        return self.timestep_embedding(timesteps, self.unet.model_channels, repeat_only=False)

    def whole(self, x, t_emb, context, *y):
        """The whole UNet from the time embedding on: the host's forward, block for block."""
        emb, h, *skips = self.shallow_in(x, t_emb, context, *y)
        return self.shallow_out(x, self.deep(h, emb, context), emb, context, *skips)

    def shallow_in(self, x, t_emb, context, *y):
        """Time embedding MLP and input blocks 0..k → (emb, h, hs[0], ..., hs[k])."""
        unet = self.unet
        emb = unet.time_embed(t_emb)
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(y[0])
        dtype = getattr(unet, "dtype", None)
        h = x.type(dtype) if dtype is not None else x
        hs = []
        for index in range(self.branch + 1):
            h = unet.input_blocks[index](h, emb, context)
            hs.append(h)
        return (emb, h, *hs)

    def deep(self, h, emb, context):
        """The deep input blocks, the middle block and the deep output blocks → the feature they leave."""
        unet, hs = self.unet, []
        for index in range(self.branch + 1, len(unet.input_blocks)):
            h = unet.input_blocks[index](h, emb, context)
            hs.append(h)
        h = unet.middle_block(h, emb, context)
        for index in range(self.split):
            h = unet.output_blocks[index](self.cat([h, hs.pop()], dim=1), emb, context)
        return h

    def shallow_out(self, x, h, emb, context, *skips):
        """The shallow output blocks on the (fresh or cached) deep feature, then the output head."""
        unet, hs = self.unet, list(skips)
        for index in range(self.split, len(unet.output_blocks)):
            h = unet.output_blocks[index](self.cat([h, hs.pop()], dim=1), emb, context)
        return unet.out(h.type(x.dtype))


class WebUIUNetRunner:
    """Runs one WebUI UNet for the SdUnet: eager, compiled (a `CompileSession`), with or without DeepCache."""

    def __init__(self, unet, host_forward: Callable, timestep_embedding: Callable, cat: Callable,
                 deepcache: tuple[int, int] | None = None, session: CompileSession | None = None):
        self.unet, self.host_forward, self.session = unet, host_forward, session
        self.interval = deepcache[0] if deepcache else 1
        self.deepcache = deepcache is not None
        # the walk serves DeepCache and the compiled whole UNet; a plain eager run uses the host's forward
        self.walk = LdmBlockWalk(unet, deepcache[1] if deepcache else 0, timestep_embedding, cat) \
            if deepcache or session is not None else None
        self.counts = RunCounts()
        self.notes: list[str] = []   # why this runner does less than its plan asked (for every job's infotext)
        self.call_index = None     # the denoiser call of the current pass (None: the host never said)
        self.features: dict[tuple, tuple] = {}   # (C, H, W, dtype, device) → (feature, call index, batch)

    def reset_counts(self) -> None:
        """A new job: its own counts (compiled code and shape buckets stay)."""
        self.counts = RunCounts()
        self.features.clear()
        self.call_index = None

    def begin_pass(self) -> None:
        """A new sampling pass (txt2img, img2img, the hires pass): no feature crosses passes."""
        self.features.clear()

    def begin_call(self, call_index: int) -> None:
        if call_index == 0:
            self.begin_pass()
        self.call_index = call_index

    # -- one UNet call -----------------------------------------------------------------------------------------
    def __call__(self, x, timesteps, context, *args, **kwargs):
        y = kwargs.pop("y", args[0] if args else None)
        extra = () if y is None else (y,)
        self.counts.calls += 1
        self.counts.batches.append(int(x.shape[0]))
        session = self.session
        if session is not None and kwargs:
            session.notice(f"UNet called with extra inputs ({', '.join(sorted(kwargs))}); running eager",
                           once="extra-kwargs")
        if session is None or kwargs:
            self.counts.eager += 1
            if not self.deepcache:
                return self.host_forward(self.unet, x, timesteps, context, *extra, **kwargs)
            return self._deepcache(x, timesteps, context, extra, compile_segments=False)
        before = session.calls["eager"]
        session.segment_call = ({}, bucket_of(x, context, y), "" if session.graphs else "no graphs")
        if self.deepcache:
            out = self._deepcache(x, timesteps, context, extra, compile_segments=True)
        else:
            from .compile.fp8 import routing

            session.prepare_precision(None, self.unet, {})   # fp8: LoRA changes re-quantized (WebUI's names)
            t_emb = self.walk.time_embedding(timesteps)
            with routing(session):
                out = _segment_compiler(session)(WHOLE_UNET, self.walk.whole, x, t_emb, context, *extra)
        if session.calls["eager"] == before:
            self.counts.compiled += 1
        else:
            self.counts.eager += 1
        return out

    def _deepcache(self, x, timesteps, context, extra: tuple, compile_segments: bool):
        segment = _segment_compiler(self.session) if compile_segments else (lambda _name, fn, *t: fn(*t))
        walk, index = self.walk, self.call_index
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        cached = self.features.get(key)
        first = segment(walk.names[0], walk.shallow_in, x, walk.time_embedding(timesteps), context, *extra)
        emb, h, skips = first[0], first[1], first[2:]
        if (index is not None and cached is not None and index - cached[1] < self.interval
                and cached[2] >= x.shape[0]):
            self.counts.shallow += 1
            feature = cached[0][:x.shape[0]]   # A1111's layout: cond rows first, a skipped uncond drops the tail
        else:
            self.counts.full += 1
            feature = segment(walk.names[1], walk.deep, h, emb, context)
            if index is not None:
                # a CUDA-graph replay reuses its output buffer: keep a copy across calls
                kept = feature.clone() if compile_segments and self.session.graphs else feature
                self.features[key] = (kept, index, int(x.shape[0]))
        return segment(walk.names[2], walk.shallow_out, x, feature, emb, context, *skips)

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c.calls} UNet calls"]
        if self.deepcache:
            parts.append(f"DeepCache {c.shallow} of {c.calls} from the cache")
        if self.session is not None:
            buckets = [describe_bucket(b) for b, s in self.session.buckets.items() if s.compiled]
            parts.append(f"{c.compiled} compiled, {c.eager} eager; {len(self.session.compiler.compile_events)} "
                         f"graph compile(s) in all for {len(buckets)} compiled bucket(s)")
        return "; ".join(parts)


def _segment_compiler(session: CompileSession) -> Callable:
    """The session's compiler of named segments (compiled, and graph-captured with CUDA graphs, per bucket)."""
    from .compile.stand_in import segment_compiler

    return segment_compiler(session)


def ldm_model_config(unet, family: str) -> dict:
    """The architecture fields of an ldm/sgm UNet for the artifact key (JSON-able, weights excluded)."""
    fields = {"family": family, "host": "webui"}
    for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "channel_mult",
                 "attention_resolutions", "num_heads", "num_head_channels", "context_dim", "num_classes",
                 "use_linear_in_transformer", "transformer_depth", "adm_in_channels"):
        value = getattr(unet, name, None)
        if isinstance(value, (list, tuple, set)):
            value = sorted(value) if isinstance(value, set) else list(value)
        if value is not None and not isinstance(value, (int, float, str, bool, list)):
            value = str(value)
        fields[name] = value
    fields["input_blocks"], fields["output_blocks"] = len(unet.input_blocks), len(unet.output_blocks)
    return fields


def make_session(backend: str, options: dict, model_config: dict, get_store=None) -> CompileSession:
    """A compile session for a WebUI UNet (inductor or inductor+cudagraphs); raises BackendUnavailable/
    AcceleratorInputError like ComfyUI's Accelerate Model does."""
    from .base import BackendUnavailable
    from .compile.inductor import INDUCTOR, INDUCTOR_CUDAGRAPHS, available, available_cudagraphs
    from .compile.session import parse_options

    if backend not in (INDUCTOR, INDUCTOR_CUDAGRAPHS):
        raise BackendUnavailable(f"{backend} does not run on the WebUI's UNet in this version (inductor and "
                                 f"inductor+cudagraphs do)")
    graphs = backend == INDUCTOR_CUDAGRAPHS
    ready = (available_cudagraphs if graphs else available)()
    if not ready:
        raise BackendUnavailable(f"{backend}: {ready.reason}")
    parsed = parse_options(options, backend, cuda_graphs=graphs)
    if parsed.precision != "auto":   # fp8 where the GPU runs it, else the model's dtype with the reason
        from .compile.fp8 import precision_in_effect

        parsed = precision_in_effect(parsed, None, torch_compile=True)
    compiler = _webui_compiler_class()(parsed)
    compiler.use_precompile(False)   # a precompiled UNet bakes ComfyUI's forward signature: not for this host
    return CompileSession(compiler, parsed, get_store=get_store, model_config=model_config)


def _webui_compiler_class():
    from .compile.inductor import InductorCompiler

    class WebUIInductorCompiler(InductorCompiler):
        """Inductor on a torch that may predate portable compile-cache artifacts (A1111 v1.10 pins torch 2.1):
        without them a new process compiles again (inductor's own on-disk FX-graph cache still helps)."""

        def __init__(self, options):
            super().__init__(options)
            import torch

            # torch 2.1's dynamo cannot trace A1111's `CondFunc` hijacks (SpatialTransformer.forward): the UNet
            # is then compiled block by block, one cache entry per block instance and batch size; with the
            # default limit of 8 the later blocks would silently run eager
            config = torch._dynamo.config
            if getattr(config, "cache_size_limit", 64) < WEBUI_CACHE_LIMIT:
                config.cache_size_limit = WEBUI_CACHE_LIMIT

        def save_artifacts(self):
            import torch

            if not hasattr(torch.compiler, "save_cache_artifacts"):
                events.notice(self.name, f"torch {torch.__version__} has no portable compile artifacts; a new "
                              f"process compiles again", level="info", once_key="webui:no-cache-artifacts")
                return None
            return super().save_artifacts()

        def load_artifacts(self, blob):
            import torch

            if not hasattr(torch.compiler, "load_cache_artifacts"):
                return "nothing loaded (this torch cannot load compile artifacts)"
            return super().load_artifacts(blob)

        def cache_counters(self):
            try:
                return super().cache_counters()
            except Exception:   # counters named differently on an old torch
                return {}

    return WebUIInductorCompiler
