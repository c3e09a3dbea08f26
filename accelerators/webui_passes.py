"""What one WebUI job applies per sampling pass and to its VAE: the schedule a pass really samples, the CFG cutoff
step in it, and the TAESD files a job can use.

Host-agnostic: the WebUI shim (scripts/comfy_accel_webui.py) passes the WebUI's objects in (the processing object
`p`, its `sd_samplers_common.setup_img2img_steps`, the models folder, the loaded model) and applies the answers
through the WebUI's own hooks. Nothing here imports the WebUI.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .options import CFG_CUTOFF_PERCENT


def img2img_sigmas(sigmas, steps: int, t_enc: int) -> list[float]:
    """The part of a `steps`-step schedule an img2img (or hires) pass samples: A1111's k-diffusion sampler takes
    `sigmas[steps - t_enc - 1:]`, with (steps, t_enc) from `sd_samplers_common.setup_img2img_steps`."""
    values = [float(s) for s in sigmas]
    return values[steps - t_enc - 1:]


def setup_img2img_steps(steps: int, denoising_strength: float, fix_steps: bool, pass_steps: int | None = None):
    """(steps, t_enc) as A1111 v1.10's `sd_samplers_common.setup_img2img_steps` computes them (the shim calls the
    WebUI's own function; this copy of the arithmetic is what the CPU tests check the cutoff step against)."""
    if fix_steps or pass_steps is not None:
        requested = pass_steps or steps
        total = int(requested / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
        return total, requested - 1
    return steps, int(min(denoising_strength, 0.999) * steps)


def cfg_cutoff_sigma(sigmas, cutoff_percent: float) -> float:
    """The WebUI's `s_min_uncond` that skips the uncond pass from the same step as ComfyUI's CFG cutoff.

    The WebUI skips when `sigma < s_min_uncond`; ComfyUI's cutoff skips from step round(total * p / 100).
    `sigmas` is the schedule including its final 0. Returns 0.0 (never skip) for 100 %.
    """
    cutoff_percent = CFG_CUTOFF_PERCENT.parse("cfg_cutoff_percent", cutoff_percent)
    values = [float(s) for s in sigmas]
    total = max(len(values) - 1, 1)
    step = round(total * cutoff_percent / 100.0)
    if step >= total:
        return 0.0
    return values[step] * (1.0 + 1e-4) + 1e-8


def pass_sigmas(p, host_setup_img2img_steps: Callable) -> list[float]:
    """The sigma schedule the pass of `p` really samples (host floats): img2img and the hires pass start part-way
    down, by the WebUI's own `setup_img2img_steps`."""
    hires = getattr(p, "is_hr_pass", False)
    if hires or hasattr(p, "init_images"):
        steps, t_enc = host_setup_img2img_steps(p, (p.hr_second_pass_steps or p.steps) if hires else None)
        return img2img_sigmas(p.sampler.get_sigmas(p, steps), steps, t_enc)
    return [float(s) for s in p.sampler.get_sigmas(p, p.steps)]


def pass_timesteps(p, host_setup_img2img_steps: Callable) -> list[float]:
    """The discrete timesteps a CompVis-sampler pass (DDIM, PLMS, UniPC) samples, ascending (host floats), from the
    sampler's own `get_timesteps`: img2img and the hires pass keep the first `t_enc` of them, as A1111's
    `sample_img2img` does."""
    hires = getattr(p, "is_hr_pass", False)
    if hires or hasattr(p, "init_images"):
        steps, t_enc = host_setup_img2img_steps(p, (p.hr_second_pass_steps or p.steps) if hires else None)
        return host_floats(p.sampler.get_timesteps(p, steps))[:t_enc]
    return host_floats(p.sampler.get_timesteps(p, p.steps))


def host_floats(values) -> list[float]:
    """A tensor (or sequence) as host floats: one copy to the CPU, not one read per element."""
    return [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def compvis_call_timesteps(timesteps: list[float], sampler: str) -> list[float] | None:
    """The timestep of each UNet call of a pass sampling `timesteps` (ascending), in call order, for the samplers
    whose calls A1111 v1.10 makes from them one by one: DDIM (and DDIM CFG++) call the model at every timestep but
    the first, from the last down; PLMS does too, calling it a second time on its first step (at the next
    timestep down, its pseudo improved Euler start). None for another sampler (UniPC: continuous times of its own)."""
    calls = timesteps[:0:-1]
    if sampler in ("ddim", "ddim_cfgpp"):
        return calls
    if sampler == "plms":
        return [timesteps[-1], timesteps[max(len(timesteps) - 2, 0)], *calls[1:]] if calls else []
    return None


def cutoff_step(sigmas: list[float], percent: float) -> tuple[float, int]:
    """(s_min_uncond, the first step it skips) for a pass sampling `sigmas`."""
    threshold = cfg_cutoff_sigma(sigmas, percent)
    first = next((i for i, s in enumerate(sigmas[:-1]) if s < threshold), None)
    return threshold, len(sigmas) - 1 if first is None else first


def taesd_overrides(folder: Path, model, is_img2img: bool) -> tuple[dict, list[str]]:
    """The VAE method settings a TAESD job sets, given the WebUI's TAESD folder (models/VAE-taesd), and the notes for
    what is missing there: without the decoder the job decodes with the full VAE, never downloads (offline it would
    fail the job)."""
    prefix = "taesd3" if getattr(model, "is_sd3", False) else "taesdxl" if getattr(model, "is_sdxl", False) \
        else "taesd"
    folder = Path(folder)
    needed = [f"{prefix}_decoder.pth"] + ([f"{prefix}_encoder.pth"] if is_img2img else [])
    missing = [name for name in needed if not (folder / name).is_file()]
    decoder, encoder = needed[0], needed[1:]
    if decoder in missing:
        return {}, [f"TAESD not used: {decoder} is not in {folder} (put madebyollin/taesd's {', '.join(needed)} "
                    f"there); decoded with the full VAE"]
    if encoder and encoder[0] in missing:
        return {"sd_vae_decode_method": "TAESD"}, [f"TAESD encode not used: {encoder[0]} is not in {folder}; "
                                                   f"encoded with the full VAE"]
    return {"sd_vae_decode_method": "TAESD", **({"sd_vae_encode_method": "TAESD"} if encoder else {})}, []
