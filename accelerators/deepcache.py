"""DeepCache: reuse the UNet's deep features between steps and run only the shallow blocks.

Adjacent denoising steps change the deep (low-resolution) features of the UNet very little. On a full
step the whole UNet runs and the feature entering the shallow output blocks (the output of the skip
branch's upsampling path) is kept; on the next `cache_interval - 1` steps only `input_blocks[:k+1]` and
`output_blocks[N-k-1:]` run (k = `cache_branch`, 0 = shallowest), reusing that feature. Interval 1 is the
plain UNet, bit for bit.

There is no block-skip hook in ComfyUI, so `UNetSegments` re-walks `openaimodel.UNetModel._forward`'s
block loop (the ONE place in the pack that knows it; tests/accelerators/test_unet_forward_shape.py fails
when the host's loop changes). It calls the host's own `forward_timestep_embed` for every block and the
`emb_patch`, `input_block_patch`, `input_block_patch_after_skip` and `output_block_patch` patches where
the host calls them, so FreeU/FreeU_V2 and attention patches keep working. A ControlNet (`control`) or a
`patches_replace` kind it does not know makes that call run the host's own forward (a full step) and
says so once per run.

The loop is cut into three segments run through `segments.run_segment`: `shallow_in` (time embedding +
shallow input blocks), `deep` (deep input blocks, middle block, deep output blocks → the cached feature)
and `shallow_out` (shallow output blocks + `out`). A full step is all three, a cached step the first and
the last, so a compile lane compiles (and captures) each once per shape and never per step.

Hooks: a `DIFFUSION_MODEL` wrapper (the loop) and an `OUTER_SAMPLE` wrapper (state reset per run), both
keyed `comfy_accel.deepcache`. Features are cached per batch composition (the conds' uuids, else
`cond_or_uncond`), so CFG cutoff dropping the uncond half mid-run is served from the cond rows.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from . import events, options
from .base import AcceleratorInputError, AcceleratorSpec, Availability, require_sd_unet, wrapper_attribute
from .sampling_progress import install_step_tracking, step_of, tracked_step
from .segments import run_segment, segment_compiler

log = logging.getLogger("comfy_accel")
_STATE_IDS = itertools.count(1)

WRAPPER_KEY = "comfy_accel.deepcache"
OPTIONS_KEY = "comfy_accel_deepcache"
# patches_replace kinds that live inside the blocks DeepCache runs (keyed by block, so honoured as-is)
SUPPORTED_REPLACE = frozenset({"attn1", "attn2"})
# transformer_options["patches"] kinds the host's UNetModel._forward calls itself (the others are called
# from inside the blocks, which run unchanged)
LOOP_PATCHES = ("emb_patch", "input_block_patch", "input_block_patch_after_skip", "output_block_patch")


@dataclass
class DeepCacheConfig:
    # a full UNet step every N steps; 1 = off (identical to the plain model)
    cache_interval: int = options.DEEPCACHE_INTERVAL.default
    # skip branch k: cached steps run input_blocks[:k+1] and output_blocks[N-k-1:]
    cache_branch: int = options.DEEPCACHE_BRANCH.default
    start_percent: float = options.PERCENT.low     # cache from this % of the steps on (full steps before)
    end_percent: float = options.PERCENT.high      # ... up to this % (full steps after)
    node_id: str | None = None     # the node that asked for it, for the notices

    def __post_init__(self):
        self.cache_interval = options.DEEPCACHE_INTERVAL.parse("cache_interval", self.cache_interval)
        self.cache_branch = options.DEEPCACHE_BRANCH.parse("cache_branch", self.cache_branch)
        self.start_percent = options.PERCENT.parse("start_percent", self.start_percent)
        self.end_percent = options.PERCENT.parse("end_percent", self.end_percent)
        if self.end_percent < self.start_percent:
            raise AcceleratorInputError(f"end_percent ({self.end_percent:g}) must not be below start_percent "
                                        f"({self.start_percent:g})")

    def last_full_step(self, step: int, total: int) -> int | None:
        """The scheduled full step a cached `step` reuses (== step on a full step); None outside the range."""
        start = round(total * self.start_percent / 100.0)
        end = round(total * self.end_percent / 100.0)
        if self.cache_interval <= 1 or not start <= step < end:
            return None
        return start + (step - start) // self.cache_interval * self.cache_interval

    def settings(self) -> dict:
        return {"cache_interval": self.cache_interval, "cache_branch": self.cache_branch,
                "start_percent": self.start_percent, "end_percent": self.end_percent}


def host_shape_problems(unet) -> list[str]:
    """What in this UNet differs from the block loop DeepCache re-walks (empty when it matches)."""
    problems = []
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    if n_in != n_out:
        problems.append(f"{n_in} input blocks but {n_out} output blocks (the skip stack must pair them)")
    if getattr(unet, "predict_codebook_ids", False):
        problems.append("predict_codebook_ids UNet (id_predictor head)")
    for attr in ("time_embed", "out", "model_channels"):
        if not hasattr(unet, attr):
            problems.append(f"no {attr}")
    return problems


class UNetSegments:
    """ComfyUI's UNetModel._forward, cut at skip branch `branch` into three stable segment functions.

    Each segment is a function of tensors; the current call's transformer_options and video arguments are
    read from `self.call`, set by the wrapper just before the segments run.
    """

    def __init__(self, unet, branch: int):
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        self.unet = unet
        self.branch = branch
        self.n = len(unet.output_blocks)
        self.split = self.n - 1 - branch          # first output block of the shallow path
        self._embed_block = forward_timestep_embed
        self._timestep_embedding = timestep_embedding
        # transformer_index the host has reached when output block `split` starts (gligen-style patches
        # read it): a cached step skips the deep blocks' increments. Full steps record the exact value (see
        # after_deep); this count is the fallback and a check for the shape tests.
        blocks = [*unet.input_blocks, *([unet.middle_block] if unet.middle_block is not None else []),
                  *unet.output_blocks[:self.split]]
        self.index_at_split = sum(isinstance(layer, SpatialTransformer) for block in blocks for layer in block)
        self.call: tuple = ({}, None, None, None)
        self.after_deep: dict[tuple, dict] = {}  # per input shape, filled by full steps
        # bound once: stable identities for the segment compiler's cache
        self.shallow_in = self._shallow_in
        self.deep = self._deep
        self.shallow_out = self._shallow_out
        self.names = tuple(f"deepcache.b{branch}.{part}" for part in ("shallow_in", "deep", "shallow_out"))

    # -- the host's block loop, piece by piece ------------------------------------------------------------
    def _embed(self, module, h, emb, context, options, output_shape=None):
        _, time_context, num_video_frames, image_only_indicator = self.call
        return self._embed_block(module, h, emb, context, options, output_shape, time_context=time_context,
                                 num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)

    def _input_block(self, index, h, hs, emb, context, options, patches):
        options["block"] = ("input", index)
        h = self._embed(self.unet.input_blocks[index], h, emb, context, options)
        for patch in patches.get("input_block_patch", ()):
            h = patch(h, options)
        hs.append(h)
        for patch in patches.get("input_block_patch_after_skip", ()):
            h = patch(h, options)
        return h

    def _output_block(self, index, h, hs, emb, context, options, patches):
        options["block"] = ("output", index)
        hsp = hs.pop()
        for patch in patches.get("output_block_patch", ()):
            h, hsp = patch(h, hsp, options)
        h = self._cat(h, hsp)
        output_shape = hs[-1].shape if len(hs) > 0 else None
        return self._embed(self.unet.output_blocks[index], h, emb, context, options, output_shape)

    @staticmethod
    def _cat(h, hsp):
        import torch

        return torch.cat([h, hsp], dim=1)

    # -- the three segments ------------------------------------------------------------------------------
    def _shallow_in(self, x, timesteps, context, y=None):
        """Time embedding and input blocks 0..k → (emb, h, hs[0], ..., hs[k])."""
        unet, options = self.unet, self.call[0]
        options["original_shape"] = list(x.shape)
        options["transformer_index"] = 0
        patches = options.get("patches", {})
        emb = unet.time_embed(self._timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
        for patch in patches.get("emb_patch", ()):
            emb = patch(emb, unet.model_channels, options)
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(y)
        h, hs = x, []
        for index in range(self.branch + 1):
            h = self._input_block(index, h, hs, emb, context, options, patches)
        return (emb, h, *hs)

    def _deep(self, h, emb, context, skip_k):
        """Input blocks k+1.., the middle block and output blocks ..N-k-2 → the feature entering block N-k-1."""
        unet, options = self.unet, self.call[0]
        patches = options.get("patches", {})
        hs = [skip_k]  # the shallow skips stay outside; only the last one's shape is read (output_shape)
        for index in range(self.branch + 1, len(unet.input_blocks)):
            h = self._input_block(index, h, hs, emb, context, options, patches)
        options["block"] = ("middle", 0)
        if unet.middle_block is not None:
            h = self._embed(unet.middle_block, h, emb, context, options)
        for index in range(self.split):
            h = self._output_block(index, h, hs, emb, context, options, patches)
        return h

    def _shallow_out(self, x, h, emb, context, *skips):
        """Output blocks N-k-1.. on the (cached or fresh) deep feature, then the output head."""
        unet, options = self.unet, self.call[0]
        patches = options.get("patches", {})
        if patches.get("output_block_patch"):
            h = h.clone()  # FreeU scales h in place: the cached feature must stay as the deep blocks left it
        hs = list(skips)
        for index in range(self.split, self.n):
            h = self._output_block(index, h, hs, emb, context, options, patches)
        return unet.out(h.type(x.dtype))

    # -- whole steps ---------------------------------------------------------------------------------------
    def full(self, x, timesteps, context, y, options):
        """A full UNet call → (output, cached feature); equal to the host's forward bit for bit."""
        first = run_segment(options, self.names[0], self.shallow_in, *_tensors(x, timesteps, context, y))
        emb, h, skips = first[0], first[1], first[2:]
        before = dict(options)
        feature = run_segment(options, self.names[1], self.deep, h, emb, context, skips[-1])
        # what the deep blocks leave in transformer_options (transformer_index, activations_shape, block):
        # a cached step restores it, so the shallow output blocks see the same options on both paths (and a
        # compiled shallow_out is not recompiled for a missing key)
        self.after_deep[tuple(x.shape)] = {k: v for k, v in options.items()
                                           if k not in before or before[k] is not v}
        out = run_segment(options, self.names[2], self.shallow_out, x, feature, emb, context, *skips)
        return out, feature

    def shallow(self, x, timesteps, context, y, options, feature):
        """A cached UNet call: shallow blocks only, on `feature` from the last full call."""
        first = run_segment(options, self.names[0], self.shallow_in, *_tensors(x, timesteps, context, y))
        emb, skips = first[0], first[2:]
        options.update(self.after_deep.get(tuple(x.shape)) or {"transformer_index": self.index_at_split})
        return run_segment(options, self.names[2], self.shallow_out, x, feature, emb, context, *skips)


def _tensors(x, timesteps, context, y):
    return (x, timesteps, context) if y is None else (x, timesteps, context, y)


@dataclass
class _Entry:
    chunks: tuple
    x_shape: tuple
    feature: object
    step: int


class DeepCacheState:
    """Everything DeepCache keeps for one patched model: the segments, the cached features, the counts."""

    def __init__(self, config: DeepCacheConfig):
        self.config = config
        self.token = next(_STATE_IDS)  # names this state in notice keys (unlike id(), never reused)
        self.segments: UNetSegments | None = None
        self.run = 0
        self.last_run: dict = {}
        self.reset()

    def reset(self) -> None:
        self.entries: dict[tuple, _Entry] = {}
        self._schedule_ref = None
        self._schedule_cpu = None
        self.counts = {"full": 0, "shallow": 0, "host": 0}

    def segments_for(self, unet) -> UNetSegments:
        if self.segments is None or self.segments.unet is not unet:
            self.segments = UNetSegments(unet, self.config.cache_branch)
        return self.segments

    # -- one decision per model call: the callback's step count, else the sigma (one host sync) ------------
    def step(self, options) -> tuple[int, int] | None:
        sample_sigmas, sigmas = options.get("sample_sigmas"), options.get("sigmas")
        if sample_sigmas is None or sigmas is None:
            return None
        tracked = tracked_step(options, sample_sigmas)
        if tracked is not None:
            return tracked
        if sample_sigmas is not self._schedule_ref:  # once per run: the schedule on the CPU
            self._schedule_ref = sample_sigmas
            self._schedule_cpu = sample_sigmas.detach().float().cpu()
        return step_of(float(sigmas.detach().max()), self._schedule_cpu)

    def cached_feature(self, key: tuple, chunks: tuple, x_shape: tuple, since: int):
        """The feature for this batch composition computed at or after step `since`, or None.

        A composition never seen (CFG cutoff dropped the uncond half) is cut from a cached one that holds
        every chunk it needs, row for row.
        """
        entry = self.entries.get(key)
        if entry is not None:
            return entry.feature if entry.step >= since else None
        if len(set(chunks)) != len(chunks):
            return None
        rows = x_shape[0] // max(len(chunks), 1)
        for other in self.entries.values():
            other_rows = other.x_shape[0] // max(len(other.chunks), 1)
            if (other.step < since or other_rows != rows or other.x_shape[1:] != x_shape[1:]
                    or not set(chunks) <= set(other.chunks) or len(set(other.chunks)) != len(other.chunks)):
                continue
            import torch

            positions = [other.chunks.index(chunk) for chunk in chunks]
            feature_rows = other.feature.shape[0] // len(other.chunks)
            feature = torch.cat([other.feature[p * feature_rows:(p + 1) * feature_rows] for p in positions])
            self.entries[key] = _Entry(chunks, x_shape, feature, other.step)
            return feature
        return None

    # -- the DIFFUSION_MODEL wrapper body ------------------------------------------------------------------
    def wrap(self, executor, x, timesteps, context, y, control, options, kwargs):
        """DeepCache takes the place of the host's forward at the end of the wrapper chain: wrappers added
        after it (inner ones) still run, around DeepCache's forward instead of the host's."""
        from comfy.patcher_extension import WrapperExecutor

        unet, host_forward = executor.class_obj, executor.original

        def deepcache_forward(*args, **kw):
            return self.forward(unet, host_forward, *args, **kw)

        inner = WrapperExecutor.new_class_executor(deepcache_forward, unet, executor.wrappers, executor.idx + 1)
        return inner.execute(x, timesteps, context, y, control, options, **kwargs)

    def forward(self, unet, host_forward, x, timesteps=None, context=None, y=None, control=None,
                transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        reason = self._host_reason(unet, control, options, y)
        if reason:
            self.counts["host"] += 1
            events.notice("deepcache", f"{reason}: running full UNet steps", once_key=f"deepcache:{self.token}:"
                          f"{self.run}:{reason}", node_id=self.config.node_id)
            return host_forward(x, timesteps, context, y, control, options, **kwargs)
        segments = self.segments_for(unet)
        segments.call = (options, kwargs.get("time_context"),
                         kwargs.get("num_video_frames", getattr(unet, "default_num_video_frames", None)),
                         kwargs.get("image_only_indicator"))
        try:
            position = self.step(options)
            since = self.config.last_full_step(*position) if position is not None else None
            chunks = tuple(options.get("uuids") or options.get("cond_or_uncond") or (None,))
            x_shape = tuple(x.shape)
            key = (chunks, x_shape, x.dtype, x.device)
            if since is not None and since < position[0]:
                feature = self.cached_feature(key, chunks, x_shape, since)
                if feature is not None:
                    self.counts["shallow"] += 1
                    return segments.shallow(x, timesteps, context, y, options, feature)
            out, feature = segments.full(x, timesteps, context, y, options)
            self.counts["full"] += 1
            if since is not None:
                if segment_compiler(options) is not None:
                    # a CUDA-graph replay may reuse the deep segment's output buffer before the next full step
                    feature = feature.clone()
                self.entries[key] = _Entry(chunks, x_shape, feature, position[0])
            return out
        finally:
            segments.call = ({}, None, None, None)  # no reference to this call's options outlives it

    def _host_reason(self, unet, control, options, y) -> str | None:
        """Why this call must run the host's own forward (None: DeepCache can serve it)."""
        if control is not None:
            return "a ControlNet/T2I adapter is attached (DeepCache cannot reuse deep features under it)"
        unknown = set(options.get("patches_replace", {})) - SUPPORTED_REPLACE
        if unknown:
            return f"unsupported patches_replace {', '.join(sorted(unknown))}"
        problems = host_shape_problems(unet)
        if problems:
            return "UNet differs from the block loop DeepCache knows (" + "; ".join(problems) + ")"
        if (y is None) != (getattr(unet, "num_classes", None) is None):
            return "class-label input does not match the UNet"
        return None

    # -- the OUTER_SAMPLE wrapper body ---------------------------------------------------------------------
    def sample(self, executor, args, kwargs):
        self.run += 1
        self.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            counts = dict(self.counts)
            calls = counts["full"] + counts["shallow"] + counts["host"]
            self.last_run = {**counts, "calls": calls}
            if calls:
                log.info("[comfy-accel] deepcache: %d of %d UNet calls served from the cache (branch %d, "
                         "interval %d)", counts["shallow"], calls, self.config.cache_branch,
                         self.config.cache_interval)
            self.reset()  # drop the cached features with the run


def deepcache_wrappers(config: DeepCacheConfig):
    """The DIFFUSION_MODEL and OUTER_SAMPLE wrappers sharing one DeepCacheState, and that state."""
    state = DeepCacheState(config)

    def deepcache_diffusion_model_wrapper(executor, x, timesteps=None, context=None, y=None, control=None,
                                          transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        return state.wrap(executor, x, timesteps, context, y, control, options, kwargs)

    def deepcache_outer_sample_wrapper(executor, *args, **kwargs):
        return state.sample(executor, args, kwargs)

    deepcache_diffusion_model_wrapper.deepcache_state = state
    return deepcache_diffusion_model_wrapper, deepcache_outer_sample_wrapper, state


def apply(model, config: DeepCacheConfig):
    """Returns a clone of the ModelPatcher that runs DeepCache; the input model is not changed."""
    from comfy.patcher_extension import WrappersMP

    unet = require_sd_unet(model, "DeepCache")
    problems = host_shape_problems(unet)
    if problems:
        raise AcceleratorInputError("DeepCache cannot walk this UNet: " + "; ".join(problems))
    branches = len(unet.output_blocks)
    if config.cache_branch >= branches:
        raise AcceleratorInputError(f"cache_branch must be between 0 and {branches - 1} for this model "
                                    f"({branches} skip branches), got {config.cache_branch}")
    diffusion_wrapper, outer_wrapper, _ = deepcache_wrappers(config)
    patched = model.clone()
    for kind, wrapper in ((WrappersMP.DIFFUSION_MODEL, diffusion_wrapper), (WrappersMP.OUTER_SAMPLE, outer_wrapper)):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    patched.model_options.setdefault("transformer_options", {})[OPTIONS_KEY] = config.settings()
    install_step_tracking(patched)  # the step of each call without waiting for the GPU (one-evaluation samplers)
    return patched


def has_deepcache(model) -> bool:
    """Whether a ModelPatcher carries DeepCache (the compile lane then compiles segments, not the UNet)."""
    wrappers = getattr(model, "wrappers", {}) or {}
    return WRAPPER_KEY in wrappers.get("diffusion_model", {})


def deepcache_state(model) -> DeepCacheState | None:
    """The state of the DeepCache a ModelPatcher carries (counts of the last run), or None."""
    return wrapper_attribute(model, "diffusion_model", WRAPPER_KEY, "deepcache_state")


def _deepcache_available() -> Availability:
    return Availability(True, "SD1.x/SD2.x/SDXL UNets; ControlNet calls run full steps (said once per run)")


ACCELERATOR_SPECS = [
    AcceleratorSpec(
        name="deepcache", title="DeepCache",
        description="Runs the full UNet every N steps and only its shallow blocks in between, reusing the "
                    "cached deep features (lossy; speed-ups in docs/benchmarks.md).",
        config=DeepCacheConfig, available=_deepcache_available, apply=apply, kind="model", lossless=False,
        order=50)
]
