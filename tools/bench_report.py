"""How tools/bench.py reports a run: the markdown table (one row a stack, what ran in its notes), the VAE decode
table, the PNG bar chart and the environment the numbers came from."""
from __future__ import annotations

import datetime as dt
import math
import platform
from pathlib import Path

import torch

from tools.bench_measure import recompiled_note
from tools.bench_stacks import UNET_STACKS, stack_named


def stack_vae(row: dict) -> str:
    stack = stack_named(UNET_STACKS, row["stack"])
    return "Tiny VAE" if stack is not None and stack.vae == "taesd" else "full VAE"


def format_table(rows: list[dict], baseline: dict | None) -> str:
    header = ("| stack | e2e median (s) | speed-up vs eager | peak VRAM (GB) | first run (s) | latent rel. err | "
              "latent PSNR (dB) |")
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['stack']} | skipped: {row['skipped']} | | | | | |")
            continue
        if "error" in row:
            lines.append(f"| {row['stack']} | failed: {row['error']} | | | | | |")
            continue
        speed = f"{baseline['median_s'] / row['median_s']:.2f}x" if baseline else "-"
        mem = f"{row['peak_mem_gb']:.2f}" if row.get("peak_mem_gb") is not None else "-"
        fid = row.get("fidelity", {})
        rel = f"{fid['rel_err']:.2e}" if fid else "-"
        psnr = ("inf" if fid and math.isinf(fid["psnr_db"]) else f"{fid['psnr_db']:.1f}") if fid else "-"
        extra = ""
        if "image_psnr_db" in fid:
            extra = f" (image PSNR {fid['image_psnr_db']:.1f} dB, SSIM {fid['image_ssim']:.3f})"
        if "sampling_median_s" in row:
            extra += f" (sampling {row['sampling_median_s']:.3f} s + {stack_vae(row)} decode)"
        if "step_cache" in row:
            extra += f" ({row['step_cache']})"
        extra += recompiled_note(row)
        if "lora_switch_s" in row:
            extra += f" (first sample after a LoRA change: {row['lora_switch_s']:.2f} s)"
        if "fidelity_vs_compiled" in row:
            vs, twin = row["fidelity_vs_compiled"], stack_named(UNET_STACKS, row["stack"]).fp8_twin
            extra += f" (vs bf16 {twin}: rel {vs['rel_err']:.2e}, PSNR {vs['psnr_db']:.1f} dB)"
        if "fp8_layers" in row:
            extra += f" ({row['fp8_layers']} layers in fp8)"
        lines.append(f"| {row['stack']}{'' if row['lossless'] else ' (lossy)'} | {row['median_s']:.3f} | {speed} | "
                     f"{mem} | {row['first_run_s']:.1f} | {rel} | {psnr}{extra} |")
    return "\n".join(lines)


def format_vae_table(vae_rows: list[dict]) -> str:
    """--vae: full KL VAE decode vs the Tiny VAE, time and peak decode memory."""
    lines = ["| VAE decode | median (s) | peak decode memory (GB) |", "|---|---|---|"]
    for r in vae_rows:
        if "skipped" in r:
            lines.append(f"| {r['stack']} | skipped: {r['skipped']} | |")
        else:
            mem = f"{r['peak_decode_mem_gb']:.2f}" if r["peak_decode_mem_gb"] is not None else "-"
            lines.append(f"| {r['stack']} {r['size']}² | {r['median_s']:.3f} | {mem} |")
    return "\n".join(lines)


def write_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in rows if "median_s" in r and "skipped" not in r and "error" not in r and "stack" in r
            and not r["stack"].startswith("vae")]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(done) + 1.5))
    names = [r["stack"] for r in done][::-1]
    values = [r["median_s"] for r in done][::-1]
    bars = ax.barh(names, values, color=["#888" if n == "eager" else "#f5b301" for n in names])
    base = next((r["median_s"] for r in done if r["stack"] == "eager"), None)
    for bar, value in zip(bars, values):
        label = f"{value:.3f}s" + (f"  {base / value:.2f}x" if base else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.set_xlabel("end-to-end sampling time, median (s) — lower is better")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def environment(cuda: bool) -> dict:
    import comfyui_version  # noqa: F401  (on sys.path after import_comfy)

    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
           "torch": torch.__version__, "comfyui": comfyui_version.__version__,
           "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
