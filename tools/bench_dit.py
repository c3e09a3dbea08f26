"""Side-by-side benchmark of a DiT (Flux, Wan, ... from `dit_factory`) on the real ComfyUI sampler, in one process:
ComfyUI eager, ComfyUI's own TorchCompileModel (the whole diffusion model, inductor) and Accelerate Model
(inductor block by block; the same replayed as CUDA graphs; inductor on the whole model, `scope` whole). For
each: the first sample (cold compile included), the median of the timed samples, peak GPU memory and the final
latent's relative error against eager. `tools.bench --model flux-dev` comes here, and on a CPU the default
`tools.bench` (./run_demo.sh) runs tiny Flux-dev here after the tiny UNet. The step-cache stacks (Step Cache on
a forced schedule, alone and under Accelerate Model with and without CUDA graphs; Step Cache adaptive at core
EasyCache's threshold; core's EasyCache alone and under core's TorchCompileModel) add what they skipped to their
row, and every row its final latent's relative error and PSNR against eager. On random weights the adaptive rules
(ours and core's EasyCache) skip nothing: a random model's prediction jumps from step to step; the forced schedule
(`step-cache-2`, 9 of 20 steps skipped) measures the speed, and `--checkpoint` the real skips and quality.

    python -m tools.bench_dit --model flux-dev                  # FLUX.1-dev architecture, bf16, 1024², 20 steps (GPU)
    python -m tools.bench_dit --model flux-schnell --steps 4    # FLUX.1-schnell, 4 steps (GPU)
    python -m tools.bench_dit --model wan21-1.3b --width 832 --height 480 --frames 9   # Wan 2.1 1.3B, 33 frames
    python -m tools.bench_dit --model tiny-flux-dev --runs 1    # a CPU smoke run
    python -m tools.bench_dit --model flux-dev --checkpoint flux1-dev.safetensors   # real weights (UNETLoader's file)

Set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for cold compile times (otherwise inductor's on-disk caches of an
earlier run make them warm).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

from tools.bench_measure import fp8_run, latent_fidelity, release, steady_median, step_cache_run, sync, timed_runs
from tools.bench_stacks import DIT_STACKS, EASYCACHE_THRESHOLD, default_stacks, forced_skips, stack_named
from tools.comfy_host import import_comfy, import_pack
from tools.dit_factory import MODEL_ALIASES

# read from the table (tools/bench_stacks.py DIT_STACKS): the names, each fp8 stack's bf16 twin, the defaults (on a
# GPU all but the whole-model compile of ours and max-autotune, minutes cold; on a CPU eager and inductor), the reasons
STACKS = tuple(stack.name for stack in DIT_STACKS)
FP8_STACKS = {stack.name: stack.fp8_twin for stack in DIT_STACKS if stack.fp8_twin}   # → its bf16 twin
DEFAULT_STACKS = {"cuda": tuple(default_stacks(DIT_STACKS, True)), "cpu": tuple(default_stacks(DIT_STACKS, False))}
GPU_ONLY = {stack.name: stack.gpu_only for stack in DIT_STACKS if stack.gpu_only}


class _EasyCacheLines(logging.Handler):
    """Core EasyCache says what it skipped only in its log line ("EasyCache - skipped N/M steps"): kept here."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if "EasyCache - skipped" in message:
            self.lines.append(message)


def run_stack(name: str, base, kwargs: dict, runs: int, cuda: bool, ctx: dict) -> tuple[dict, torch.Tensor]:
    torch._dynamo.reset()
    release(cuda)
    easycache_lines, root = _EasyCacheLines(), logging.getLogger()
    level = root.level
    root.addHandler(easycache_lines)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)   # its line is an info record
    try:
        row, out = _run_stack(name, base, kwargs, runs, cuda, ctx)
    finally:
        root.removeHandler(easycache_lines)
        root.setLevel(level)
    if easycache_lines.lines:
        row["easycache"] = easycache_lines.lines[-1]
        if " - skipped 0/" in row["easycache"]:
            row["note"] = "core EasyCache skipped nothing (random weights: the prediction jumps between steps)"
    return row, out


def _run_stack(name: str, base, kwargs: dict, runs: int, cuda: bool, ctx: dict) -> tuple[dict, torch.Tensor]:
    from tools.dit_factory import sample_dit

    model = stack_named(DIT_STACKS, name).build(base, ctx)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(cuda)
    started = time.perf_counter()
    out = sample_dit(model, **kwargs)
    sync(cuda)
    first = time.perf_counter() - started
    times, steady, last = timed_runs(lambda: sample_dit(model, **kwargs), runs, cuda)
    out = last if times else out
    median = steady_median(times, steady) if times else first
    row = {"stack": name, "first_s": round(first, 2), "median_s": round(median, 3),
           "compile_s": round(first - median, 1), "runs": [round(t, 3) for t in times]}
    if not all(steady):
        row["recompiled_runs_s"] = [round(t, 3) for t, ok in zip(times, steady) if not ok]
    if cuda:
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    row.update(step_cache_run(model))
    row.update(fp8_run(model))
    print(f"[bench_dit] {json.dumps(row)}", flush=True)
    return row, out


def fp8_fidelity(out, latents: dict, twin: str) -> dict:
    """An fp8 stack's final latent against bf16 eager and the bf16 compiled twin (random DiT weights amplify
    last-bit differences over the blocks: compiled bf16 is itself some way from eager), relative error and PSNR."""
    found = {}
    for label, name in (("eager", "eager"), ("compiled", twin if twin in latents else
                                               next((n for n in ("inductor+cudagraphs", "inductor") if n in latents),
                                                    None))):
        if name in latents:
            fid = latent_fidelity(out, latents[name])
            found[f"vs_bf16_{label}"] = {"stack": name, "rel_err": round(fid["rel_err"], 4),
                                         "psnr_db": round(fid["psnr_db"], 1)}
    print(f"[bench_dit] fp8 fidelity: {json.dumps(found)}", flush=True)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--stacks", default=None, help=f"of {', '.join(STACKS)} (default: "
                        f"{','.join(DEFAULT_STACKS['cuda'])} on a GPU, {','.join(DEFAULT_STACKS['cpu'])} on a CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=None, help="pixels (latent = /8); default 1024 on a GPU")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--frames", type=int, default=1, help="latent frames (video models)")
    parser.add_argument("--tokens", type=int, default=None, help="text tokens (default 512 on a GPU, as Flux's T5)")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--easycache-threshold", type=float, default=EASYCACHE_THRESHOLD,
                        help="core EasyCache's reuse_threshold (to skip as many steps as the step-cache stacks), "
                             "also step-cache-adaptive's threshold")
    parser.add_argument("--easycache-sweep", default="",
                        help="comma-separated thresholds: core EasyCache runs once (eager) at each, and the one "
                             "skipping closest to step-cache-2's count becomes --easycache-threshold")
    parser.add_argument("--checkpoint", default=None,
                        help="real weights of the --model family: its diffusion-model file in the native layout "
                             "(conditioning stays random: no text encoder is loaded)")
    args = parser.parse_args(argv)
    args.model = MODEL_ALIASES.get(args.model, args.model)
    ctx = {"easycache_threshold": args.easycache_threshold}   # what core EasyCache and step-cache-adaptive use
    cuda = torch.cuda.is_available()
    stacks = args.stacks.split(",") if args.stacks else DEFAULT_STACKS["cuda" if cuda else "cpu"]
    unknown = set(stacks) - set(STACKS)
    if unknown:
        print(f"unknown stack(s): {', '.join(sorted(unknown))}; known: {', '.join(STACKS)}", file=sys.stderr)
        return 2
    import_comfy()
    import_pack()
    from tools.dit_factory import build_dit

    size = 1024 if cuda else 64
    width, height = args.width or size, args.height or size
    runs = args.runs if args.runs is not None else (3 if cuda else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    device = "cuda" if cuda else None
    base = load_dit_checkpoint(args.checkpoint, args.model, dtype, device) if args.checkpoint else \
        build_dit(args.model, dtype=dtype, device=device)
    print(f"[bench_dit] built {args.model} ({sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e9:.2f}"
          f" B params, {dtype}) in {time.perf_counter() - started:.1f} s", flush=True)
    kwargs = {"steps": args.steps, "cfg": 1.0, "height": height // 8, "width": width // 8, "frames": args.frames,
              "tokens": args.tokens or (512 if cuda else 8)}
    env = {"device": torch.cuda.get_device_name(0) if cuda else "CPU", "torch": torch.__version__,
           "date": dt.date.today().isoformat(), "model": args.model, "size": f"{width}x{height}",
           "steps": args.steps, "dtype": str(dtype), "weights": args.checkpoint or "random"}
    print(f"[bench_dit] {json.dumps(env)}", flush=True)
    if args.easycache_sweep:
        ctx["easycache_threshold"] = easycache_sweep(base, kwargs, [float(t) for t in args.easycache_sweep.split(",")])
        env["easycache_threshold"] = ctx["easycache_threshold"]
    rows, reference, latents = [], None, {}
    for name in stacks:
        if name in GPU_ONLY and not cuda:
            rows.append({"stack": name, "skipped": GPU_ONLY[name]})
            print(f"[bench_dit] {json.dumps(rows[-1])}", flush=True)
            continue
        try:
            row, out = run_stack(name, base, kwargs, runs, cuda, ctx)
        except Exception as exc:   # one stack failing must not lose the others' numbers
            row, out = {"stack": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}, None
            print(f"[bench_dit] {json.dumps(row)}", flush=True)
        if out is not None and reference is None and name == "eager":
            reference = out
        elif out is not None and reference is not None:
            fidelity = latent_fidelity(out, reference)
            row["rel_err_vs_eager"] = fidelity["rel_err"]
            row["latent_psnr_db"] = round(fidelity["psnr_db"], 1) if fidelity["psnr_db"] != float("inf") else "inf"
        if out is not None:
            latents[name] = out
        if out is not None and name in FP8_STACKS:
            row.update(fp8_fidelity(out, latents, FP8_STACKS[name]))
        rows.append(row)
    eager = next((r for r in rows if r["stack"] == "eager" and "median_s" in r), None)
    for row in rows:
        if eager and "median_s" in row:
            row["speedup"] = round(eager["median_s"] / row["median_s"], 2)
    print(json.dumps({"env": env, "rows": rows}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


def easycache_sweep(base, kwargs: dict, thresholds: list) -> float:
    """The threshold at which core EasyCache (eager, one sample each) skips closest to step-cache-2's count: on
    random weights its default skips nothing, so the like-for-like comparison needs its own threshold."""
    want, found = forced_skips(kwargs["steps"]), []
    for threshold in thresholds:
        row, _ = run_stack("comfy-easycache", base, kwargs, 0, torch.cuda.is_available(),
                           {"easycache_threshold": threshold})
        skipped = re.search(r"skipped (\d+)/", row.get("easycache", ""))
        found.append((abs(int(skipped.group(1)) - want) if skipped else kwargs["steps"], threshold,
                      int(skipped.group(1)) if skipped else None))
    best = min(found)
    print(f"[bench_dit] easycache sweep (threshold, skipped): {[(t, n) for _, t, n in found]}; step-cache-2 "
          f"skips {want}: threshold {best[1]}", flush=True)
    return best[1]


def load_dit_checkpoint(path: str, name: str, dtype, device=None):
    """Real weights for the `name` family: the family's model as `dit_factory` builds it (the host's config for
    the full-size families), its weights replaced by the file's (a diffusion-model file as published, e.g. BFL's
    flux1-dev.safetensors; a `model.diffusion_model.` prefix is dropped). Every weight must match: a file of
    another layout (scaled fp8, diffusers keys) is refused with the keys that differ."""
    import comfy.utils

    from tools.dit_factory import DIT_SPECS, build_dit

    if name not in DIT_SPECS:
        raise SystemExit(f"--checkpoint needs --model naming its family, one of {', '.join(DIT_SPECS)}")
    patcher = build_dit(name, dtype=dtype, device=device, check_alive=False)
    prefix = "model.diffusion_model."
    weights = {k.removeprefix(prefix): v for k, v in comfy.utils.load_torch_file(path).items()}
    missing, unexpected = patcher.model.diffusion_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{path} is not a {name} diffusion model in the native layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return patcher


if __name__ == "__main__":
    sys.exit(main())
