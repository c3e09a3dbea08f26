"""Where the time of one UNet call goes on a CUDA GPU, and what inductor settings change it: eager, the eager
kernels as one CUDA graph, then for each named inductor config the compiled UNet with and without our graph
(and, with --cudnn-benchmark, re-captured with cuDNN choosing its convolution algorithms by timing them).

    python -m tools.profile_unet [sd15|sdxl] [--configs default,autotune] [--cudnn-benchmark]
                                 [--channels-last] [--profile]

Random-weight full-size model, batch 2 (CFG), 512² for SD1.5 and 1024² for SDXL; CUDA events, mean of 20 calls
after 3 warm-ups; the relative error is against the eager call. The figures quoted in docs/benchmarks.md come
from this script.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

# inductor config patches by name; "default" is what the compile lane uses on a GPU (compile/inductor.py)
CONFIGS = {
    "default": {"conv_1x1_as_mm": True},
    "no-config": {},
    "benchmark-fusion": {"conv_1x1_as_mm": True, "benchmark_fusion": True},
    "autotune-gemm": {"conv_1x1_as_mm": True, "max_autotune_gemm": True,
                      "max_autotune_gemm_backends": "ATEN,TRITON"},
    "autotune": {"conv_1x1_as_mm": True, "max_autotune": True},
    "autotune-cd": {"conv_1x1_as_mm": True, "max_autotune": True, "coordinate_descent_tuning": True},
}


def time_ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def rel_err(out, reference) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.profile_unet", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--configs", default="default",
                        help=f"comma-separated inductor configs to compile with: {', '.join(CONFIGS)}; "
                             "suffixes: " + "; ".join(f"'+{k}' {v}" for k, v in SUFFIXES.items()))
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="also re-capture each compiled UNet with torch.backends.cudnn.benchmark on")
    parser.add_argument("--channels-last", action="store_true",
                        help="convert the UNet's weights and the input to channels-last before compiling")
    parser.add_argument("--profile", action="store_true",
                        help="print the top kernels of the first config's compiled call (torch.profiler)")
    args = parser.parse_args(argv)
    for label in args.configs.split(","):
        name, *suffixes = label.split("+")
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        if set(suffixes) - set(SUFFIXES):
            parser.error(f"unknown suffix in {label!r}; choose from {', '.join(SUFFIXES)}")
    return args


# '+'-suffixes of a config name
SUFFIXES = {
    "cl": "convert the UNet's weights and input to channels-last in place first (it stays so for later configs)",
    "cudnn": "compile and capture with cuDNN's attention preferred to flash attention (SDPA's backend choice is "
             "made while tracing, so it is baked into the compiled code)",
}


def attention_preference(suffixes: list[str]):
    """A context that makes SDPA prefer cuDNN's attention (flash where cuDNN cannot run a shape), or nothing."""
    import contextlib

    if "cudnn" not in suffixes:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                       set_priority=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_unet needs a CUDA GPU (it times CUDA graphs)", file=sys.stderr)
        return 2
    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    import comfy.model_management as mm

    from comfy_accel.accelerators.compile.session import parse_options
    from comfy_accel.accelerators.compile.stand_in import use_compile_friendly_attention
    from comfy_accel.accelerators.compile.graphs import CapturedCall
    from comfy_accel.accelerators.compile.inductor import InductorCompiler
    from tools.model_factory import build_model, unet_inputs

    pixels = 512 if args.model == "sd15" else 1024
    model = build_model(args.model, dtype=torch.float16, device="cuda")
    mm.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    x, t, c, y = unet_inputs(model, batch=2, height=pixels, width=pixels)
    options: dict = {}
    use_compile_friendly_attention(options)
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {args.model} batch 2, {pixels}² px")
    with torch.inference_mode():
        reference = unet(x, t, context=c, y=y, transformer_options=dict(options)).float()
        print(f"eager call: {time_ms(lambda: unet(x, t, context=c, y=y, transformer_options={})):.2f} ms")
        graph = CapturedCall(lambda a, b, cc: unet(a, b, context=cc, y=y, transformer_options={}), (x, t, c),
                             torch.cuda.graph_pool_handle())
        print(f"eager kernels as one CUDA graph: {time_ms(lambda: graph(x, t, c)):.2f} ms")
        graph = None   # frees the eager graph before compiling
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        for label in args.configs.split(","):
            name, *suffixes = label.split("+")
            if "cl" in suffixes:
                unet.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            torch._dynamo.reset()
            compiler = InductorCompiler(parse_options({}, "inductor"))
            compiler.config_patches = dict(CONFIGS[name])
            compiled = compiler.compile_module(unet)

            def call(a, b, cc):
                return compiled(a, b, context=cc, y=y, transformer_options=dict(options))

            preference = attention_preference(suffixes)
            preference.__enter__()   # left after this config's timings and profile
            started = time.time()
            graph = CapturedCall(call, (x, t, c), torch.cuda.graph_pool_handle())
            seconds = time.time() - started
            line = (f"inductor {label}: compile+capture {seconds:.0f} s, graph {time_ms(lambda: graph(x, t, c)):.2f} "
                    f"ms, without graph {time_ms(lambda: call(x, t, c)):.2f} ms, "
                    f"rel err {rel_err(graph(x, t, c), reference):.2e}")
            if args.cudnn_benchmark:
                with torch.backends.cudnn.flags(enabled=True, benchmark=True,
                                                deterministic=torch.backends.cudnn.deterministic,
                                                allow_tf32=torch.backends.cudnn.allow_tf32):
                    tuned = CapturedCall(call, (x, t, c), torch.cuda.graph_pool_handle())
                line += f"; cudnn.benchmark graph {time_ms(lambda: tuned(x, t, c)):.2f} ms"
                tuned = None
            print(line, flush=True)
            if args.profile:
                print_top_kernels(lambda: call(x, t, c))
            preference.__exit__(None, None, None)
            graph = None
    return 0


def print_top_kernels(fn, calls: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
