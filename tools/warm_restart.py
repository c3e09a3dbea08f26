"""Cold vs warm start of inductor+cudagraphs in one fresh process (GPU): the first-sample time, the next
samples, and (with --profile) the kernels and CPU time of one sample. Run it twice with the same artifact store
and an empty inductor cache each time; the second run is the warm restart quoted in docs/benchmarks.md.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m tools.warm_restart --store /tmp/store cold
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m tools.warm_restart --store /tmp/store warm --profile
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tag", help="a label for the printed lines (cold, warm, ...)")
    parser.add_argument("--store", required=True, help="the artifact store folder shared by both runs")
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also profile one sample (kernels, CPU time)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="profile the first sample's Python (cProfile) and print its N costliest functions")
    parser.add_argument("--load-threads", default="1",
                        help="inductor's compile threads while cached kernels load ('default': its own count)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compile.stand_in import session_of
    from comfy_accel.accelerators.compile.inductor import InductorCompiler, apply_cudagraphs
    from tools.model_factory import build_model, make_conditioning, sample

    InductorCompiler.warm_compile_threads = None if args.load_threads == "default" else int(args.load_threads)
    size = 1024 if args.model == "sdxl" else 512
    imported = time.perf_counter() - started
    model = build_model(args.model, dtype=torch.float16, device="cuda")
    positive, negative = make_conditioning(model, width=size, height=size)
    accelerated = apply_cudagraphs(model, {"fallback": "error", "store": ArtifactStore(args.store), "node_id": "w"})

    def one_sample():
        torch.cuda.synchronize()
        start = time.perf_counter()
        sample(accelerated, steps=20, width=size, height=size, positive=positive, negative=negative)
        torch.cuda.synchronize()
        return round(time.perf_counter() - start, 3)

    if args.cprofile:   # where a warm start's seconds go: deserializing, loading kernels, capturing
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        times = [profiler.runcall(one_sample)]
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.cprofile)
        print("\n".join(f"[{args.tag}] {line}" for line in text.getvalue().splitlines() if line.strip()))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile // 2)
        print("\n".join(f"[{args.tag}] self {line}" for line in text.getvalue().splitlines() if line.strip()))
        times += [one_sample() for _ in range(args.samples - 1)]
    else:
        times = [one_sample() for _ in range(args.samples)]
    print(f"[{args.tag}] import {imported:.1f} s; first sample {times[0]} s, then {times[1:]}; "
          f"calls {session_of(accelerated).calls}", flush=True)
    from comfy_accel.accelerators.compile import preimport

    done = preimport.summary()
    print(f"[{args.tag}] background import of the compiler since the pack's import: "
          + (f"{done['total']:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in done['seconds'].items())})"
             if done else f"not run ({preimport.not_wanted_reason() or 'already imported'})"), flush=True)
    for notice in events.recent(10):
        print(f"[{args.tag}] notice: {notice['message'][:200]}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            one_sample()
        averages = prof.key_averages()
        gpu_ms = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1000
        launches = sum(e.count for e in averages if getattr(e, "self_device_time_total", 0) > 0)
        print(f"[{args.tag}] one sample: {gpu_ms:.1f} ms of GPU time over {launches} kernel launches")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
