"""Does xformers load with this torch, does ComfyUI pick it for attention, and what does that change?

Prints `[xformers]` lines: the version and whether its C++/CUDA library loaded, one attention call against
torch's SDPA (difference, time), the attention ComfyUI chose at import, and full SD1.5 512² eager sampling
(20 steps) with ComfyUI's choice vs its own SDPA attention forced through the `optimized_attention_override`
hook: time and the final latent's difference. Run with xformers importable (tools/gpu_stable_fast.sh carries
xformers 0.0.35 and the CUDA 12 runtime it links, for torch 2.11+cu130).

    python -m tools.probe_xformers [--steps 20] [--size 512] [--runs 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def say(text: str) -> None:
    print(f"[xformers] {text}", flush=True)


def timed(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_call() -> None:
    import xformers
    import xformers.ops

    say(f"version {xformers.__version__}, C++/CUDA library loaded: {getattr(xformers, '_has_cpp_library', '?')}")
    q, k, v = (torch.randn(2, 4096, 8, 40, device="cuda", dtype=torch.float16) for _ in range(3))
    ours = xformers.ops.memory_efficient_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err = ((ours.float() - sdpa.float()).norm() / sdpa.float().norm()).item()
    t_x = timed(lambda: xformers.ops.memory_efficient_attention(q, k, v), 20)
    t_s = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                          v.transpose(1, 2)), 20)
    say(f"memory_efficient_attention (2×4096 tokens, 8 heads of 40) vs SDPA: rel diff {err:.1e}, "
        f"{t_x * 1e3:.3f} ms vs {t_s * 1e3:.3f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        attention_call()
    except Exception as exc:
        say(f"does not run here: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    import comfy.model_management as mm
    from comfy.ldm.modules import attention

    chosen = attention.optimized_attention.__name__
    say(f"ComfyUI: XFORMERS_IS_AVAILABLE={mm.XFORMERS_IS_AVAILABLE}, xformers_enabled()={mm.xformers_enabled()}, "
        f"attention chosen: {chosen}")
    from comfy_accel.accelerators.compile.stand_in import sdpa_attention_override
    from tools.model_factory import build_model, make_conditioning, sample

    model = build_model("sd15", dtype=torch.float16)
    positive, negative = make_conditioning(model, width=args.size, height=args.size)
    forced = model.clone()
    forced.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        sdpa_attention_override
    kwargs = dict(steps=args.steps, width=args.size, height=args.size, positive=positive, negative=negative)
    latents = {}

    def run(name, patcher):
        latents[name] = sample(patcher, **kwargs)

    t_chosen = timed(lambda: run("chosen", model), args.runs)
    t_sdpa = timed(lambda: run("sdpa", forced), args.runs)
    err = ((latents["chosen"] - latents["sdpa"]).norm() / latents["sdpa"].norm()).item()
    say(f"SD1.5 {args.size}² {args.steps} steps eager: ComfyUI's choice ({chosen}) {t_chosen:.3f} s, "
        f"SDPA forced {t_sdpa:.3f} s ({t_sdpa / t_chosen:.2f}x), final latent rel diff {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
