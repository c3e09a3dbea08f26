"""Which part of an fp8 (UNETLoader fp8_e4m3fn_fast) sample moves when it is compiled: the fp8 model's eager
latent against ComfyUI's own TorchCompileModel, our inductor without graphs and with graphs, and the fp16 model
for scale. A GPU with fp8 compute (Hopper) is needed for the fp8 matrix multiplies to run at all.

    python -m tools.probe_fp8 [--model small-sd15] [--steps 4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.probe_fp8")
    parser.add_argument("--model", default="small-sd15")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    import comfy.model_management as mm
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compile.inductor import apply, apply_cudagraphs
    from tools.model_factory import build_model, load_unet_as, sample

    base = build_model(args.model, dtype=torch.float16, device="cuda", seed=9)
    fp8 = load_unet_as(base, "fp8_e4m3fn_fast", Path(tempfile.mkdtemp(prefix="fp8_")))
    print(f"[fp8] fp8 compute: {mm.supports_fp8_compute(fp8.load_device)}")
    fp16_latent = sample(base, steps=args.steps)
    eager = sample(fp8, steps=args.steps)
    again = sample(fp8, steps=args.steps)
    print(f"[fp8] fp8 eager vs fp16 eager {rel(eager, fp16_latent):.3e}; fp8 eager twice {rel(again, eager):.3e}")
    store = ArtifactStore(Path(tempfile.mkdtemp(prefix="fp8store_")))
    comfy = fp8.clone()
    set_torch_compile_wrapper(comfy, backend="inductor")
    rows = [("ComfyUI TorchCompileModel", comfy),
            ("ours inductor", apply(fp8, {"fallback": "error", "store": store})),
            ("ours inductor+cudagraphs", apply_cudagraphs(fp8, {"fallback": "error", "store": store}))]
    host_compiled = None
    for label, model in rows:
        try:
            out = sample(model, steps=args.steps)
            versus = f", vs TorchCompileModel {rel(out, host_compiled):.3e}" if host_compiled is not None else ""
            host_compiled = out if host_compiled is None else host_compiled
            print(f"[fp8] {label} vs fp8 eager {rel(out, eager):.3e}{versus}", flush=True)
        except Exception as exc:
            print(f"[fp8] {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
