"""How fast each of FLUX.1-dev's GEMM shapes (1024²: 4096 image, 512 text, 4608 joint tokens) or SDXL's (`--model
sdxl`: 1024², the batch of 2 that CFG runs) runs on this GPU:
bf16 `F.linear`; row-wise fp8 as the pack runs it (`fp8.fp8_linear`, the activation quantized per call) eager and
compiled by inductor (default; `--max-autotune` adds inductor's GEMM templates, about a minute a shape); the
bare `torch._scaled_mm` row-wise and per-tensor (what cuBLAS reaches without row scales). CUDA events, median of `--reps`; TFLOP/s per shape and the
step's weighted total, so a change of GEMM kernel is judged on the shapes that carry the step's FLOPs.

    python -m tools.probe_fp8_gemm            # GPU with fp8 tensor cores
    python -m tools.probe_fp8_gemm --model sdxl --only "bf16 linear,fp8 ours inductor,scaled_mm row-wise"
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

# (name, M, K, N, per step): the linear layers of a FLUX.1-dev step at 1024² (19 double, 38 single blocks)
FLUX_SHAPES = (("double img qkv", 4096, 3072, 9216, 19), ("double img proj", 4096, 3072, 3072, 19),
               ("double img mlp.0", 4096, 3072, 12288, 19), ("double img mlp.2", 4096, 12288, 3072, 19),
               ("double txt qkv", 512, 3072, 9216, 19), ("double txt mlp.0", 512, 3072, 12288, 19),
               ("single linear1", 4608, 3072, 21504, 38), ("single linear2", 4608, 15360, 3072, 38))
# (name, M, K, N, per UNet call): SDXL's transformer blocks at 1024², batch 2 (CFG); 10 blocks at 64² latent
# tokens (640 channels), 60 at 32² (1280). "attn" is each block's six C×C layers (self q/k/v/out, cross q/out);
# the cross-attention k/v (77 tokens) and proj_in/out (kept in the model's dtype) are left out: a few % of the FLOPs
SDXL_SHAPES = (("64² attn", 8192, 640, 640, 60), ("64² ff in (GEGLU)", 8192, 640, 5120, 10),
               ("64² ff out", 8192, 2560, 640, 10), ("32² attn", 2048, 1280, 1280, 360),
               ("32² ff in (GEGLU)", 2048, 1280, 10240, 60), ("32² ff out", 2048, 5120, 1280, 60))
SHAPES = {"flux": (FLUX_SHAPES, "the Flux step's linear layers"), "sdxl": (SDXL_SHAPES, "one SDXL UNet call's")}


def median_ms(fn, reps: int) -> float:
    for _ in range(10):   # the first calls of a kernel (its load, the clocks rising) are not its rate
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def variants(x, weight, bias, max_autotune: bool):
    from comfy_accel.accelerators.compile import fp8

    w8, w_scale = fp8.quantize_rows(weight)
    w_scale = w_scale.t().contiguous()
    x8, x_scale = fp8.quantize_rows(x)
    one = torch.ones((), device=x.device)
    linear = lambda: torch.nn.functional.linear(x, weight, bias)   # noqa: E731
    ours = lambda: fp8.fp8_linear(x, w8, w_scale, bias)   # noqa: E731
    compiled = torch.compile(lambda x_: fp8.fp8_linear(x_, w8, w_scale, bias), fullgraph=True)
    rowwise = lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias,  # noqa: E731
                                       out_dtype=torch.bfloat16, use_fast_accum=True)
    tensorwise = lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,  # noqa: E731
                                          use_fast_accum=True)
    found = {"bf16 linear": linear, "fp8 ours eager": ours, "fp8 ours inductor": lambda: compiled(x),
             "scaled_mm row-wise": rowwise, "scaled_mm per-tensor": tensorwise}
    if max_autotune:
        tuned = torch.compile(lambda x_: fp8.fp8_linear(x_, w8, w_scale, bias), fullgraph=True,
                              options={"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"})
        found["fp8 ours max-autotune"] = lambda: tuned(x)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="flux")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--max-autotune", action="store_true", help="also inductor's GEMM templates (slow)")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default all)")
    args = parser.parse_args(argv)
    from tools.comfy_host import import_pack

    import_pack()
    totals: dict = {}
    shapes, what = SHAPES[args.model]
    for name, m, k, n, count in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn((m, k), device="cuda", dtype=torch.bfloat16, generator=gen)
        weight = torch.randn((n, k), device="cuda", dtype=torch.bfloat16, generator=gen) / k ** 0.5
        bias = torch.randn((n,), device="cuda", dtype=torch.bfloat16, generator=gen) * 0.01
        flop = 2 * m * k * n
        row = {"shape": name, "mkn": [m, k, n]}
        for label, fn in variants(x, weight, bias, args.max_autotune).items():
            if args.only and label not in args.only.split(","):
                continue
            try:
                ms = median_ms(fn, args.reps)
            except Exception as exc:   # a variant this torch cannot run: say so, go on
                row[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            row[label] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
            totals[label] = totals.get(label, 0.0) + ms * count
        print(f"[gemm] {json.dumps(row)}", flush=True)
    print(f"[gemm] total ms ({what}): "
          f"{json.dumps({k: round(v, 1) for k, v in totals.items()})}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
