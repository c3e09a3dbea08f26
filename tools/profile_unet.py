"""Where the time of one UNet call goes on a CUDA GPU: eager, the eager kernels as one CUDA graph, inductor with
and without our graph, and the top kernels of the compiled call (torch.profiler).

    python -m tools.profile_unet [sd15|sdxl] [number of inductor configs to try, 1-2]

Random-weight full-size model, batch 2 (CFG), 512² for SD1.5 and 1024² for SDXL; CUDA events, mean of 20 calls.
The figures quoted in docs/benchmarks.md come from this script.
"""
from __future__ import annotations

import sys
import time

import torch

CONFIGS = [("default", {"conv_1x1_as_mm": True}), ("no config", {})]


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


def main(argv: list[str]) -> int:
    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    import comfy.model_management as mm

    from comfy_accel.accelerators.compiled_unet import parse_options, use_compile_friendly_attention
    from comfy_accel.accelerators.cuda_graphs import CapturedCall
    from comfy_accel.accelerators.torch_compile import InductorCompiler
    from tools.model_factory import build_model, unet_inputs

    name = argv[0] if argv else "sd15"
    tries = int(argv[1]) if len(argv) > 1 else 1
    pixels = 512 if name == "sd15" else 1024
    model = build_model(name, dtype=torch.float16, device="cuda")
    mm.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    x, t, c, y = unet_inputs(model, batch=2, height=pixels, width=pixels)
    with torch.inference_mode():
        print(f"eager call: {time_ms(lambda: unet(x, t, context=c, y=y, transformer_options={})):.2f} ms")
        graph = CapturedCall(lambda a, b, cc: unet(a, b, context=cc, y=y, transformer_options={}), (x, t, c),
                             torch.cuda.graph_pool_handle())
        print(f"eager kernels as one CUDA graph: {time_ms(lambda: graph(x, t, c)):.2f} ms")
        for label, config in CONFIGS[:tries]:
            torch._dynamo.reset()
            compiler = InductorCompiler(parse_options({}, "inductor"))
            compiler.config_patches = config
            compiled = compiler.compile_module(unet)
            options: dict = {}
            use_compile_friendly_attention(options)
            started = time.time()
            graph = CapturedCall(lambda a, b, cc: compiled(a, b, context=cc, y=y, transformer_options=dict(options)),
                                 (x, t, c), torch.cuda.graph_pool_handle())
            plain = time_ms(lambda: compiled(x, t, context=c, y=y, transformer_options=dict(options)))
            print(f"inductor {label}: compile+capture {time.time() - started:.1f} s, graph "
                  f"{time_ms(lambda: graph(x, t, c)):.2f} ms, without graph {plain:.2f} ms")
            if label == "default":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        compiled(x, t, context=c, y=y, transformer_options=dict(options))
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
