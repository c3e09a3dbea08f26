"""Does dynamo's ahead-of-time compile of the UNet give a warm restart without a trace (the ≤5 s target of
issue 4), on this torch? A probe for the next GPU session, not a backend: run it twice, `save` then `load`, each
in a fresh process (the second with an empty inductor cache to see the worst case, or the first one's cache to
see the best).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m tools.probe_precompile save /tmp/unet.precompiled --model sd15
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m tools.probe_precompile load /tmp/unet.precompiled --model sd15

What it uses is torch's experimental module precompile (torch 2.13: `torch._dynamo.config.enable_aot_compile`,
`OptimizedModule._aot_compile` / `_save_aot_compiled_module` / `_load_aot_compiled_module`): one full graph of
`UNetModel.forward` per input signature, saved with its compiled code, loaded by a new process onto a live
module without tracing it; the weights are read from the module on every call (a LoRA patched in place is
seen). ComfyUI's layer classes are defined inside `comfy.ops` classes, which dynamo's guard serializer refuses
("defined in local scope"), so the guards are filtered to the input tensors' (`torch.compiler.
keep_tensor_guards_unsafe`): the caller must then only use it for the signature it was built for (one shape
bucket, no patches), as the compile session does. The tensor guards compare dispatch keys with
the thread's state when the file is loaded, so it must be loaded in the mode it runs in (inference_mode, as
ComfyUI samples; loaded outside it, the first call fails its guard). On this project's CPU box (torch 2.13, tiny
SD1.5): build 67 s, 2 MiB; a new process loads it in 2.4 s with inductor's cache warm (34 s with it empty: the
C++ kernels are compiled again), traces no dynamo frame and gives the building process's output. On an H100
(torch 2.11, full SD1.5 fp16): build 61 s, 47 MiB (the triton kernels are in the file); a new process loads it
in 3.3 s even with inductor's cache empty. This result made it the default of inductor+cudagraphs
(accelerators/compile/precompile.py); the probe stays as the quick check for a new torch.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=("save", "load"))
    parser.add_argument("path", help="the precompiled file to write (save) or read (load)")
    parser.add_argument("--model", default="tiny-sd15", help="tiny-sd15, sd15, sdxl, ... (tools.model_factory)")
    parser.add_argument("--with-cache-artifacts", action="store_true",
                        help="save: also write torch's compile-cache artifacts to PATH.cache; load: load them "
                             "first (what the shared cache would hold beside the precompiled file)")
    parser.add_argument("--preimport", action="store_true",
                        help="load: import the compiler's modules first, as the pack's startup thread does "
                             "(accelerators/compile/preimport.py), so that the load time is the load alone")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    from torch._dynamo.utils import counters

    from comfy_accel.accelerators.compile.stand_in import use_compile_friendly_attention
    from tools.model_factory import build_model, unet_inputs

    if not hasattr(torch._dynamo.config, "enable_aot_compile"):
        print(f"[precompile] torch {torch.__version__} has no dynamo AOT compile (torch._dynamo.config."
              f"enable_aot_compile)")
        return 2
    torch._dynamo.config.enable_aot_compile = True
    from torch._dynamo.aot_compile import ModelInput

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    size = 1024 if "sdxl" in args.model else (512 if args.model in ("sd15", "sd21") else 64)
    model = build_model(args.model, dtype=dtype, device=device, seed=3)
    unet = model.model.diffusion_model.to(device)
    x, t, c, y = unet_inputs(model, batch=2, height=size, width=size, device=device)
    options: dict = {}
    use_compile_friendly_attention(options)
    kwargs = {"context": c, "y": y, "transformer_options": dict(options)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        reference = unet(x, t, **{**kwargs, "transformer_options": dict(options)}).float()
    print(f"[precompile] {args.stage}: torch {torch.__version__}, {args.model} on {device}, ready in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    if args.preimport:
        from comfy_accel.accelerators.compile import preimport

        begun = time.perf_counter()
        preimport.import_compiler_modules(preimport.MODULES + preimport.GPU_MODULES)
        print(f"[precompile] compiler modules imported in {time.perf_counter() - begun:.1f} s", flush=True)
    compiled = torch.compile(unet, fullgraph=True, backend="inductor",
                             options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
    begun = time.perf_counter()
    try:
        if args.stage == "save":
            compiled._aot_compile([ModelInput(args=(x, t), kwargs=kwargs, contexts=[torch.inference_mode()])])
            size_bytes = len(compiled._save_aot_compiled_module(args.path))
            print(f"[precompile] compiled in {time.perf_counter() - begun:.1f} s; {size_bytes / 2**20:.1f} MiB "
                  f"written", flush=True)
            if args.with_cache_artifacts:
                saved = torch.compiler.save_cache_artifacts()
                if saved is not None:
                    with open(args.path + ".cache", "wb") as f:
                        f.write(saved[0])
                    print(f"[precompile] cache artifacts {len(saved[0]) / 2**20:.1f} MiB written", flush=True)
        else:
            if args.with_cache_artifacts:
                with open(args.path + ".cache", "rb") as f:
                    torch.compiler.load_cache_artifacts(f.read())
                print(f"[precompile] cache artifacts loaded in {time.perf_counter() - begun:.1f} s", flush=True)
            # loaded in the mode it runs in (ComfyUI samples under inference_mode): the tensor guards compare
            # dispatch keys against the thread's state at load time
            with open(args.path, "rb") as f, torch.inference_mode():
                compiled._load_aot_compiled_module(f.read())
            print(f"[precompile] loaded in {time.perf_counter() - begun:.1f} s", flush=True)
        with torch.inference_mode():
            begun = time.perf_counter()
            out = compiled(x, t, **{**kwargs, "transformer_options": dict(options)}).float()
            sync()
            first = time.perf_counter() - begun
            begun = time.perf_counter()
            for _ in range(5):
                compiled(x, t, **{**kwargs, "transformer_options": dict(options)})
            sync()
            per_call = (time.perf_counter() - begun) / 5
    except Exception as exc:   # what the next person needs is the one line
        message = " ".join(str(exc).split())
        print(f"[precompile] failed: {type(exc).__name__}: {message[:600]}")
        return 1
    error = ((out - reference).norm() / reference.norm()).item()
    print(f"[precompile] first call {first:.2f} s, then {per_call * 1000:.1f} ms a call (no CUDA graph); error vs "
          f"eager {error:.2e}; dynamo frames traced in this process: {counters['stats']['unique_graphs']}; "
          f"process total {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
