"""The main job: a side-by-side benchmark of accelerator stacks on the real ComfyUI sampler.

One process, one model, one seed: the baseline (plain ComfyUI eager), ComfyUI's own TorchCompileModel
path, and every accelerator stack available on this machine each sample the same latent; a table gives
the end-to-end sampling time (median of N after a warm-up), the speed-up over eager, peak GPU memory,
the first-run time (compile/build included) and the fidelity against eager (relative error and PSNR of
the final latent). Results also go to JSON and a PNG bar chart.

    python -m tools.bench                          # CPU: tiny SD1.5, then tiny Flux-dev; CUDA: SD1.5 512², 20 steps
    python -m tools.bench --model sdxl             # full SDXL 1024² (GPU)
    python -m tools.bench --model flux-dev         # FLUX.1-dev architecture (GPU): eager, core compile, ours
    python -m tools.bench --stacks eager,cfg-cutoff-50 --runs 5
    python -m tools.bench --model sdxl --decode    # each timed run = sampling + VAE decode (Tiny VAE stacks)
    python -m tools.bench --checkpoint my.safetensors   # real weights: adds PSNR/SSIM of decoded images
    python -m tools.bench --list                   # the stacks and whether they can run here
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from tools.bench_measure import (fp8_run, image_fidelity, latent_fidelity, release, steady_median, step_cache_run,
                                 sync, timed_runs)
from tools.bench_report import environment, format_table, format_vae_table, write_chart
from tools.bench_stacks import UNET_STACKS as STACKS
from tools.bench_stacks import Stack, default_stacks, stack_availability
from tools.comfy_host import import_comfy, import_pack

OUT_DIR = Path(__file__).resolve().parent.parent / "bench_out"


def run_stack(stack: Stack, base, args, cuda: bool, ctx: dict) -> dict:
    from tools.model_factory import sample

    row = {"stack": stack.name, "title": stack.title, "lossless": stack.lossless}
    kwargs = dict(steps=args.steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, seed=args.seed,
                  width=args.width, height=args.height, batch=args.batch, positive=ctx["positive"],
                  negative=ctx["negative"])
    decoder = ctx.get("decoders", {}).get(stack.vae)

    sampling_times = []

    def one_image():
        sampling_started = time.perf_counter()
        latent = sample(model, **kwargs)
        if decoder is not None:  # --decode: the image is part of the timed run (ComfyUI's VAEDecode call)
            sync(cuda)
            sampling_times.append(time.perf_counter() - sampling_started)
            decoder.decode(latent.to(torch.float32))
        return latent

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = stack.build(base, ctx)
    latent = one_image()
    sync(cuda)
    row["first_run_s"] = time.perf_counter() - start
    times, steady, last = timed_runs(one_image, args.runs, cuda)
    latent = last if times else latent
    row["times_s"] = times
    row["median_s"] = steady_median(times, steady) if times else row["first_run_s"]
    if not all(steady):
        row["recompiled_runs_s"] = [t for t, ok in zip(times, steady) if not ok]
    if sampling_times[1:]:  # the timed runs' sampling part, without the decode
        row["sampling_median_s"] = steady_median(sampling_times[1:], steady)
    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    row.update(step_cache_run(model))
    row.update(fp8_run(model))
    if getattr(args, "lora_switch", False):
        row["lora_switch_s"] = _time_lora_switch(model, kwargs, cuda)
    if getattr(args, "steps_sweep", False):
        row.update(_steps_sweep(model, kwargs, cuda, row["median_s"]))
    row["latent"] = latent
    if ctx.get("vae") is not None:
        row["image"] = ctx["vae"].decode(latent[:1].to(torch.float32)).float().cpu()
    model = None   # the stack's graphs and compiled code go before the next stack
    return row


def _steps_sweep(model, kwargs: dict, cuda: bool, median_at_steps: float) -> dict:
    """Splits a sample's time into a cost per step and a fixed cost per sample (ComfyUI's set-up: noise,
    conditioning, the model-loading check, copying the latent back), from the medians of 3 samples at half and
    twice the step count and the timed runs: what a faster UNet call can still win and what it cannot."""
    from tools.model_factory import sample

    steps = kwargs["steps"]
    points = {steps: median_at_steps}
    for count in (max(steps // 2, 1), steps * 2):
        times = []
        for _ in range(3):
            sync(cuda)
            start = time.perf_counter()
            sample(model, **{**kwargs, "steps": count})
            sync(cuda)
            times.append(time.perf_counter() - start)
        points[count] = statistics.median(times)
    per_step, fixed = fit_steps(points)
    return {"per_step_ms": per_step * 1e3, "fixed_ms": fixed * 1e3,
            "steps_sweep_s": {str(x): points[x] for x in sorted(points)}}


def fit_steps(seconds_by_steps: dict) -> tuple[float, float]:
    """Least-squares line through (steps, seconds): (seconds per step, fixed seconds per sample)."""
    xs = sorted(seconds_by_steps)
    mean_x, mean_y = statistics.mean(xs), statistics.mean(seconds_by_steps[x] for x in xs)
    per_step = (sum((x - mean_x) * (seconds_by_steps[x] - mean_y) for x in xs)
                / sum((x - mean_x) ** 2 for x in xs))
    return per_step, mean_y - per_step * mean_x


def _time_lora_switch(model, kwargs: dict, cuda: bool) -> float:
    """Seconds to the first sample after a LoRA is loaded after the stack (ComfyUI's LoraLoader path)."""
    import comfy.sd

    from tools.model_factory import random_lora, sample

    with_lora = comfy.sd.load_lora_for_models(model, None, random_lora(model), 1.0, 0.0)[0]
    sync(cuda)
    start = time.perf_counter()
    sample(with_lora, **kwargs)
    sync(cuda)
    seconds = time.perf_counter() - start
    sample(model, **kwargs)  # LoRA removed again, so the next stack starts from the base weights
    return seconds


def _vae_family(args) -> str:
    return "sdxl" if (args.model or "").endswith("sdxl") else "sd"


def _decoders(args, ctx: dict) -> dict:
    """--decode: the full VAE (the checkpoint's, else a random-weight one) and the Tiny VAE of the model's family."""
    from tools.model_factory import build_vae

    decoders = {"full": ctx["vae"] if ctx.get("vae") is not None else build_vae()}
    try:
        from tools.taesd_factory import make_tiny_vae

        decoders["taesd"] = make_tiny_vae(_vae_family(args))
    except Exception as exc:  # the stacks that need it are then skipped by their requires
        print(f"[bench] Tiny VAE unavailable: {exc}", flush=True)
    return decoders


def _vae_section(args, cuda: bool) -> list[dict]:
    """Full KL VAE decode vs the Tiny VAE (TAESD) on the same latent: time and peak memory."""
    rows = []
    try:
        from comfy_accel.accelerators import registry

        spec = registry.get("taesd")
        if not spec.available().ok:
            return [{"stack": "vae", "skipped": spec.available().reason}]
        from tools.model_factory import build_vae
        from tools.taesd_factory import make_tiny_vae  # written with the Tiny VAE accelerator
    except Exception as exc:  # the Tiny VAE lane may be absent in a partial checkout
        return [{"stack": "vae", "skipped": f"Tiny VAE unavailable: {exc}"}]
    family = _vae_family(args)
    latent = torch.randn(1, 4, args.vae_size // 8, args.vae_size // 8, generator=torch.Generator().manual_seed(0))
    for name, make in (("vae-full", lambda: build_vae()), ("vae-taesd", lambda: make_tiny_vae(family))):
        vae = make()
        vae.decode(latent)  # warm-up: loads weights to the device
        sync(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        times = []
        for _ in range(max(args.runs, 3)):
            start = time.perf_counter()
            vae.decode(latent)
            sync(cuda)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 1e9 if cuda else None
        rows.append({"stack": name, "median_s": statistics.median(times), "peak_decode_mem_gb": peak,
                     "size": args.vae_size})
        del vae
        release(cuda)
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tiny-sd15 | tiny-sdxl | small-sd15 | sd15 | sdxl, or a DiT "
                        "of tools/dit_factory.py: flux-dev (flux), flux-schnell, wan21-1.3b (wan), tiny-* "
                        "(default: sd15 with CUDA, tiny-sd15 on CPU)")
    parser.add_argument("--checkpoint", default=None, help="a real checkpoint (.safetensors): its UNet, CLIP and VAE "
                        "replace the random model; adds PSNR/SSIM of decoded images")
    parser.add_argument("--prompt", default="a photo of a lighthouse on a cliff at sunset, detailed")
    parser.add_argument("--stacks", default=None, help="comma-separated stack names (default: all that can run)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per stack after the warm-up")
    parser.add_argument("--vae", action="store_true", help="also compare full VAE decode with the Tiny VAE")
    parser.add_argument("--lora-switch", action="store_true",
                        help="also time the first sample after a LoRA is loaded after each stack")
    parser.add_argument("--steps-sweep", action="store_true",
                        help="also time half and twice the steps: the cost per step and the fixed cost per sample")
    parser.add_argument("--vae-size", type=int, default=1024)
    parser.add_argument("--decode", action="store_true",
                        help="time sampling + VAE decode (full VAE; the Tiny VAE for stacks that swap it in)")
    parser.add_argument("--dit", default=None, help="also bench this DiT (tools/bench_dit.py) after the UNet "
                        "(default: tiny-flux-dev on a CPU when neither --model nor --stacks is given; none: skip)")
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("--list", action="store_true")
    from tools.dit_factory import MODEL_ALIASES

    args = parser.parse_args(argv)
    args.model = MODEL_ALIASES.get(args.model, args.model)
    return args


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    from tools.dit_factory import DIT_SPECS

    if args.model in DIT_SPECS:   # DiTs (flux-dev, wan21-1.3b, tiny-*): their own side-by-side (tools/bench_dit.py)
        from tools import bench_dit

        forwarded = ["--model", args.model, "--steps", str(args.steps)]
        for flag, value in (("--width", args.width), ("--height", args.height), ("--runs", args.runs),
                            ("--stacks", args.stacks)):
            forwarded += [flag, str(value)] if value is not None else []
        return bench_dit.main(forwarded)
    import_comfy()
    import_pack()
    cuda = torch.cuda.is_available()
    if args.dit is None:   # the CPU demo shows a tiny DiT next to the tiny UNet
        args.dit = "none" if cuda or args.model or args.stacks else "tiny-flux-dev"
    if args.model is None:
        args.model = "sd15" if cuda else "tiny-sd15"
    default_size = {"sdxl": 1024, "sd15": 512}.get(args.model, 512 if cuda else 128)
    args.width = args.width or default_size
    args.height = args.height or default_size
    args.runs = args.runs or (5 if cuda else 3)
    if not cuda:
        args.vae_size = min(args.vae_size, 256)

    selected = args.stacks.split(",") if args.stacks else default_stacks(STACKS, cuda)
    not_default = [] if args.stacks else [s.name for s in STACKS if s.name not in selected]
    unknown = set(selected) - {s.name for s in STACKS}
    if unknown:
        print(f"unknown stack(s): {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in STACKS)}",
              file=sys.stderr)
        return 2
    if args.list:
        for stack in STACKS:
            ok, reason = stack_availability(stack, cuda, args.decode)
            print(f"{stack.name:24s} {'ready' if ok else 'skip: ' + reason}")
        from tools.optional_libraries import xformers_status

        print(f"{'xformers':24s} {xformers_status()[1]}")
        return 0

    from tools.model_factory import build_model, make_conditioning

    dtype = torch.float16 if cuda else torch.float32
    ctx: dict = {}
    print(f"[bench] building {args.checkpoint or args.model} ({dtype}) ...", flush=True)
    if args.checkpoint:
        base, ctx["positive"], ctx["negative"], ctx["vae"] = _load_checkpoint(args)
    else:
        base = build_model(args.model, dtype=dtype)
        ctx["positive"], ctx["negative"] = make_conditioning(base, width=args.width, height=args.height)
    ctx["store"] = _bench_store(Path(args.out))
    if args.decode:
        ctx["decoders"] = _decoders(args, ctx)
    env = environment(cuda)
    print(f"[bench] {env['device']} · torch {env['torch']} · ComfyUI {env['comfyui']} · {args.model} "
          f"{args.width}x{args.height} · {args.steps} steps {args.sampler} cfg {args.cfg} · batch {args.batch}",
          flush=True)

    rows: list[dict] = []
    baseline = None
    for stack in STACKS:
        if stack.name in not_default:
            rows.append({"stack": stack.name, "skipped": "compiling on CPU takes minutes and gains nothing here; "
                                                         f"add it with --stacks eager,{stack.name}"})
        if stack.name not in selected:
            continue
        ok, reason = stack_availability(stack, cuda, args.decode)
        if not ok:
            rows.append({"stack": stack.name, "skipped": reason})
            print(f"[bench] {stack.name}: skipped ({reason})", flush=True)
            continue
        print(f"[bench] {stack.name}: running ...", flush=True)
        try:
            row = run_stack(stack, base, args, cuda, ctx)
        except Exception as exc:
            traceback.print_exc()
            rows.append({"stack": stack.name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            _reset_compilers()
            release(cuda)
            continue
        if stack.name == "eager":
            baseline = row
        if baseline is not None:
            row["fidelity"] = latent_fidelity(row["latent"], baseline["latent"])
            if "image" in row and "image" in baseline:
                row["fidelity"].update(image_fidelity(row["image"], baseline["image"]))
        twin = next((r for r in rows if stack.fp8_twin and r.get("stack") == stack.fp8_twin and "latent" in r), None)
        if twin is not None:   # every fp8 stack: also against its bf16 compiled twin
            row["fidelity_vs_compiled"] = latent_fidelity(row["latent"], twin["latent"])
        rows.append(row)
        speed = f", {baseline['median_s'] / row['median_s']:.2f}x eager" if baseline else ""
        print(f"[bench] {stack.name}: median {row['median_s']:.3f} s{speed}, first run {row['first_run_s']:.1f} s",
              flush=True)
        if "per_step_ms" in row:
            points = ", ".join(f"{k} steps {v:.3f} s" for k, v in row["steps_sweep_s"].items())
            fit = (f"{row['per_step_ms']:.2f} ms per step + {row['fixed_ms']:.1f} ms per sample"
                   if row["fixed_ms"] >= 0 else "not linear in the step count (a CPU-bound run varies)")
            print(f"[bench] {stack.name}: {fit} ({points})", flush=True)
        _reset_compilers()
        release(cuda)

    vae_rows = _vae_section(args, cuda) if args.vae else []
    table = format_table(rows, baseline)
    print()
    print(table)
    if vae_rows:
        print()
        print(format_vae_table(vae_rows))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {"environment": env, "settings": {k: v for k, v in vars(args).items() if k not in ("list",)},
              "rows": [{k: v for k, v in r.items() if k not in ("latent", "image")} for r in rows],
              "vae": vae_rows, "table_markdown": table}
    json_path = out_dir / f"bench-{args.model}-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str))
    chart = write_chart(rows, out_dir / f"bench-{args.model}-{stamp}.png",
                        f"{env['device']} · {args.model} {args.width}² · {args.steps} steps · torch {env['torch']}")
    print(f"\n[bench] results: {json_path}" + (f", chart: {chart}" if chart else ""))
    if args.dit != "none":
        from tools import bench_dit

        print(f"\n[bench] {args.dit} (a DiT, compiled block by block):", flush=True)
        return bench_dit.main(["--model", args.dit, "--steps", str(args.steps),
                               "--out", str(out_dir / f"bench-{args.dit}-{stamp}.json")])
    return 0


def _reset_compilers():
    """Each stack compiles from scratch and frees what it captured, so stacks do not share graphs or memory."""
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    try:
        from comfy_accel.accelerators.cache.api import live_objects

        live_objects().clear()  # the captured CUDA graphs of the stack before
    except Exception:
        pass


def _bench_store(out_dir: Path):
    """The artifact cache the bench uses: COMFY_ACCEL_CACHE if set, else bench_out/accel_cache."""
    try:
        from comfy_accel.accelerators.cache import ArtifactStore, resolve_cache_root

        return ArtifactStore(resolve_cache_root(host_default=out_dir / "accel_cache"))
    except Exception:  # the cache lane absent in a partial checkout: backends then run without disk cache
        return None


def _load_checkpoint(args):
    """A real checkpoint: its UNet, its CLIP for the prompt, its VAE for image fidelity."""
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]

    def encode(text):
        tokens = clip.tokenize(text)
        return [[*clip.encode_from_tokens(tokens, return_pooled=True, return_dict=False)[:1],
                 {"pooled_output": clip.encode_from_tokens(tokens, return_pooled=True)[1],
                  "width": args.width, "height": args.height}]]

    return model, encode(args.prompt), encode("blurry, low quality"), vae


if __name__ == "__main__":
    sys.exit(main())
