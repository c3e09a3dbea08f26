"""Where a DiT's sample time goes, and what a LoRA change costs, on a GPU (issue 16's remaining figures):

    python -m tools.profile_dit --model flux-dev            # 1024², 20 steps, 512 text tokens

1. `[lora]`: Accelerate Model (inductor+cudagraphs), with and without `keep_weights_on_gpu`: a plain sample, the
   first sample after a LoRA is loaded after the node (ComfyUI's LoRA loader), the first after its strength
   changes, and the first after it is removed.
2. `[kernels]`: one sampling step of the compiled model (no graphs, so the profiler sees each kernel) split into
   GEMMs, attention and the rest, each with its share of the GPU time and, for GEMMs and attention, the rate
   reached against the step's FLOP count (the floor the issue states).
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


def lora_costs(model, kwargs: dict, keep: bool) -> dict:
    import comfy.sd

    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.cache import ArtifactStore
    from tools.dit_factory import random_dit_lora, sample_dit

    store = ArtifactStore(tempfile.mkdtemp(prefix="accel-store-"))
    accelerated, _ = accelerate(model, "inductor+cudagraphs", fallback="error", get_store=lambda: store,
                                keep_weights_on_gpu=keep)
    sample = lambda patcher: (lambda: sample_dit(patcher, **kwargs))   # noqa: E731
    row = {"keep_weights_on_gpu": keep, "first_s": timed(sample(accelerated))}
    row["plain_s"] = min(timed(sample(accelerated)) for _ in range(2))
    lora = random_dit_lora(model)
    with_lora = comfy.sd.load_lora_for_models(accelerated, None, lora, 1.0, 0.0)[0]
    row["lora_loaded_s"] = timed(sample(with_lora))
    row["lora_again_s"] = timed(sample(with_lora))
    stronger = comfy.sd.load_lora_for_models(accelerated, None, lora, 0.5, 0.0)[0]
    row["lora_strength_changed_s"] = timed(sample(stronger))
    row["lora_removed_s"] = timed(sample(accelerated))
    return row


def kernel_split(model, kwargs: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.cache import ArtifactStore
    from tools.dit_factory import sample_dit

    store = ArtifactStore(tempfile.mkdtemp(prefix="accel-store-"))
    compiled, _ = accelerate(model, "inductor", fallback="error", get_store=lambda: store)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--size", type=int, default=1024, help="pixels, square")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--parts", default="lora,kernels")
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
        for keep in (True, False):
            torch._dynamo.reset()
            print(f"[lora] {json.dumps(lora_costs(model, kwargs, keep))}", flush=True)
    if "kernels" in parts:
        torch._dynamo.reset()
        print(f"[kernels] {json.dumps(kernel_split(model, kwargs))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
