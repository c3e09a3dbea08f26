"""What both benches measure besides time: how far a stack's result is from the baseline's (latent and image
fidelity) and what actually ran (the steps Step Cache skipped, the layers that ran in fp8); and the clean-up
between stacks, so that one stack's graphs, memory and host records do not count against the next."""
from __future__ import annotations

import gc
import math
import statistics
import time

import torch


def sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def release(cuda: bool):
    """The stack before is garbage (its clone dropped), in reference cycles: collected now, so its CUDA graphs and
    fp8 copies (freed with its session) do not count in the next stack's peak, as ComfyUI's own gc between prompts."""
    from tools.comfy_host import forget_dropped_models

    gc.collect()
    forget_dropped_models()   # else every later sample pays ComfyUI's full gc (comfy_host.forget_dropped_models)
    if cuda:
        torch.cuda.empty_cache()


def latent_fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float())
    rel = (diff.norm() / ref.float().norm().clamp_min(1e-12)).item()
    mse = diff.pow(2).mean().item()
    span = (ref.max() - ref.min()).item()
    psnr = float("inf") if mse == 0 else 20 * math.log10(span) - 10 * math.log10(mse)
    return {"rel_err": rel, "psnr_db": psnr}


def image_fidelity(img: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR and SSIM (11-px Gaussian window, per channel) of decoded images in [0, 1], NHWC."""
    a, b = img.float().permute(0, 3, 1, 2), ref.float().permute(0, 3, 1, 2)
    mse = (a - b).pow(2).mean().item()
    psnr = float("inf") if mse == 0 else -10 * math.log10(mse)
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(a.shape[1], 1, 11, 11)
    blur = lambda t: torch.nn.functional.conv2d(t, window, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean()
    return {"image_psnr_db": psnr, "image_ssim": ssim.item()}


def step_cache_run(model) -> dict:
    """What the stack's Step Cache did in the last timed run ({} without one)."""
    from comfy_accel.accelerators.step_cache import step_cache_state

    state = step_cache_state(model)
    return {"step_cache": state.last_run["line"]} if state is not None and state.last_run else {}


def fp8_run(model) -> dict:
    """How many linear layers ran in fp8 under Accelerate Model's precision fp8, and in how many calls ({}: none)."""
    from comfy_accel.accelerators.compile.stand_in import session_of

    session = session_of(model)
    fp8 = getattr(session, "fp8", None)
    return {"fp8_layers": len(fp8.routes), "fp8_calls": fp8.calls} if fp8 is not None else {}


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (ours, core's TorchCompileModel's)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def timed_runs(run, count: int, cuda: bool):
    """Times `count` calls of run(). A call during which torch.compile compiled a graph (a guard failed, a recompile:
    core's TorchCompileModel + EasyCache's second Flux sample took 142 s against 1.9 s) is not a steady-state time:
    it is reported apart and left out of the median, unless every call compiled. Returns (times, steady, result):
    steady[i] says whether call i compiled nothing."""
    times, steady, result = [], [], None
    for _ in range(count):
        before = compiled_graphs()
        sync(cuda)
        started = time.perf_counter()
        result = run()
        sync(cuda)
        times.append(time.perf_counter() - started)
        steady.append(compiled_graphs() == before)
    return times, steady, result


def steady_median(times: list, steady: list) -> float:
    kept = [t for t, ok in zip(times, steady) if ok] or times
    return statistics.median(kept)


def recompiled_note(row: dict) -> str:
    """' (N timed runs recompiled: … s; left out of the median)' for a row whose timed runs compiled, else ''."""
    slow = row.get("recompiled_runs_s")
    if not slow:
        return ""
    every = len(slow) == len(row.get("runs", row.get("times_s", [])))
    runs = "runs" if len(slow) > 1 else "run"
    seconds = ", ".join(f"{t:.1f}" for t in slow)
    where = "every run did: the median is of all" if every else "left out of the median"
    return f" ({len(slow)} timed {runs} recompiled: {seconds} s; {where})"
