"""Where a DiT's sample time goes, and what a LoRA change costs, on a GPU (issue 16's remaining figures):

    python -m tools.profile_dit --model flux-dev            # 1024², 20 steps, 512 text tokens

1. `[lora]`: Accelerate Model (inductor+cudagraphs), with and without `keep_weights_on_gpu`: a plain sample, the
   first sample after a LoRA is loaded after the node (ComfyUI's LoRA loader), the first after its strength
   changes, and the first after it is removed.
2. `[kernels]`: one sampling step of the compiled model (no graphs, so the profiler sees each kernel) split into
   GEMMs, attention and the rest, each with its share of the GPU time and, for GEMMs and attention, the rate
   reached against the step's FLOP count (the floor the issue states); `--precision fp8` for the fp8 model's.
3. `[timeline]`: a whole sample of the graphed model (`--backend`, `--precision`) under the profiler: wall time
   and GPU busy time a step, the longest GPU idle gaps with the host calls that ran during them, and every host
   sync the sample makes (torch's sync debug mode, with the Python lines that asked for it). Where the sample
   takes longer than its kernels, this says which host work the GPU waited for.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from tools.comfy_host import import_comfy, import_pack

GEMM = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "matmul", "mm_")
ATTENTION = ("flash", "fmha", "attention", "sdpa")


def category(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in ATTENTION):
        return "attention"
    return "gemm" if any(k in name for k in GEMM) else "other"


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - started, 3)


def lora_costs(model, kwargs: dict, keep: bool, precision: str = "auto") -> dict:
    import comfy.sd

    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.cache import ArtifactStore
    from tools.dit_factory import random_dit_lora, sample_dit

    store = ArtifactStore(tempfile.mkdtemp(prefix="accel-store-"))
    accelerated, _ = accelerate(model, "inductor+cudagraphs", fallback="error", get_store=lambda: store,
                                keep_weights_on_gpu=keep, precision=precision)
    sample = lambda patcher: (lambda: sample_dit(patcher, **kwargs))   # noqa: E731
    row = {"precision": precision, "keep_weights_on_gpu": keep, "first_s": timed(sample(accelerated))}
    row["plain_s"] = min(timed(sample(accelerated)) for _ in range(2))
    lora = random_dit_lora(model)
    with_lora = comfy.sd.load_lora_for_models(accelerated, None, lora, 1.0, 0.0)[0]
    row["lora_loaded_s"] = timed(sample(with_lora))
    row["lora_again_s"] = timed(sample(with_lora))
    stronger = comfy.sd.load_lora_for_models(accelerated, None, lora, 0.5, 0.0)[0]
    row["lora_strength_changed_s"] = timed(sample(stronger))
    row["lora_removed_s"] = timed(sample(accelerated))
    return row


def kernel_split(model, kwargs: dict, precision: str = "auto") -> dict:
    from torch.profiler import ProfilerActivity, profile

    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.cache import ArtifactStore
    from tools.dit_factory import sample_dit

    store = ArtifactStore(tempfile.mkdtemp(prefix="accel-store-"))
    compiled, _ = accelerate(model, "inductor", fallback="error", get_store=lambda: store, precision=precision)
    one_step = dict(kwargs, steps=1)
    sample_dit(compiled, **one_step)    # compiles
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sample_dit(compiled, **one_step)
        torch.cuda.synchronize()
    split: dict = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            split[category(event.key)] += device_us / 1e3
    total = sum(split.values())
    return {"step_ms": round(total, 1), **{f"{k}_ms": round(v, 1) for k, v in split.items()},
            **{f"{k}_share": round(v / total, 3) for k, v in split.items() if total}}


def _sync_sites(run) -> dict:
    """{"<message> @ file:line:function <- ...": count} of every host sync `run` makes (torch's sync debug mode)."""
    import collections
    import traceback
    import warnings
    from pathlib import Path

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-5:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames))
        sites[f"{str(message).splitlines()[0][:50]} @ {where}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode(1)
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(sites.most_common(12))


def timeline(model, kwargs: dict, backend: str, precision: str, gaps: int = 8) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.cache import ArtifactStore
    from tools.dit_factory import sample_dit

    store = ArtifactStore(tempfile.mkdtemp(prefix="accel-store-"))
    accelerated, _ = accelerate(model, backend, fallback="error", get_store=lambda: store, precision=precision)
    run = lambda: sample_dit(accelerated, **kwargs)   # noqa: E731
    run()   # compiles, captures
    wall = min(timed(run) for _ in range(2))
    syncs = _sync_sites(run)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = list(prof.events())
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy, spans, last = 0.0, [], None
    for start, end in kernels:   # the union of kernel intervals; the gaps between them
        if last is None or start > last:
            if last is not None:
                spans.append((start - last, last, start))
            busy += end - start
            last = end
        elif end > last:
            busy += end - last
            last = end
    host = [e for e in events if e.device_type == DeviceType.CPU]

    def during(lo, hi):   # the host calls overlapping a gap, longest overlap first
        overlap: dict = {}
        for e in host:
            o = min(e.time_range.end, hi) - max(e.time_range.start, lo)
            if o > 0:
                overlap[e.name] = overlap.get(e.name, 0) + o
        return [f"{name} {us / 1e3:.2f}ms" for name, us in sorted(overlap.items(), key=lambda i: -i[1])[:6]]

    blocking = {}
    for e in host:
        if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                      "cudaMemcpyAsync", "cudaStreamWaitEvent") and e.cpu_time_total > 100:
            blocking.setdefault(e.name, []).append(round(e.cpu_time_total / 1e3, 2))
    span_ms = (kernels[-1][1] - kernels[0][0]) / 1e3 if kernels else 0.0
    steps = kwargs["steps"]
    return {"backend": backend, "precision": precision, "wall_s": wall,
            "wall_ms_per_step": round(wall * 1e3 / steps, 1),
            "kernels": len(kernels), "gpu_span_ms": round(span_ms, 1), "gpu_busy_ms": round(busy / 1e3, 1),
            "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 1),
            "idle_in_span_ms": round(span_ms - busy / 1e3, 1), "gaps_over_0.1ms": sum(1 for g in spans if g[0] > 100),
            "longest_gaps": [{"ms": round(g / 1e3, 2), "host": during(lo, hi)}
                             for g, lo, hi in sorted(spans, reverse=True)[:gaps]],
            "blocking_host_calls_ms": {k: v[:12] for k, v in blocking.items()}, "syncs": syncs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--size", type=int, default=1024, help="pixels, square")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--parts", default="lora,kernels", help="lora, kernels, timeline")
    parser.add_argument("--lora-keep", default="true,false", help="lora: keep_weights_on_gpu values to run")
    parser.add_argument("--backend", default="inductor+cudagraphs", help="timeline: the stack's backend")
    parser.add_argument("--precision", default="auto", help="lora, kernels, timeline: auto, fp8 or auto+fp8")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("[profile_dit] needs a CUDA GPU")
        return 2
    import_comfy()
    import_pack()
    from tools.dit_factory import build_dit

    model = build_dit(args.model, seed=0, dtype=torch.bfloat16, device="cuda")
    kwargs = {"steps": args.steps, "height": args.size // 8, "width": args.size // 8, "tokens": args.tokens}
    parts = args.parts.split(",")
    if "lora" in parts:
        for precision in args.precision.split("+"):
            for keep in args.lora_keep.split(","):
                torch._dynamo.reset()
                print(f"[lora] {json.dumps(lora_costs(model, kwargs, keep == 'true', precision))}", flush=True)
    if "kernels" in parts:
        for precision in args.precision.split("+"):   # e.g. auto+fp8: both, one after the other
            torch._dynamo.reset()
            print(f"[kernels] {json.dumps({'precision': precision, **kernel_split(model, kwargs, precision)})}",
                  flush=True)
    if "timeline" in parts:
        for precision in args.precision.split("+"):   # e.g. auto+fp8: both, one after the other
            torch._dynamo.reset()
            print(f"[timeline] {json.dumps(timeline(model, kwargs, args.backend, precision))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
