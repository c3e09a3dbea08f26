"""Tiny VAE: swap the full KL VAE for TAESD / TAESDXL (madebyollin's tiny autoencoder).

The tiny decoder is ~1/50 of the KL decoder's compute and memory, so decoding at 1024² is many times
faster, at the price of slightly softer images. The weights are the ones ComfyUI itself uses for live
previews: `taesd_encoder.*` + `taesd_decoder.*` (SD1.x/2.x) or `taesdxl_*` (SDXL) in `models/vae_approx`.
The VAE is built exactly as ComfyUI's VAELoader builds its `taesd`/`taesdxl` entries (prefixed state
dicts plus the family's `vae_scale`/`vae_shift`, then `comfy.sd.VAE`), so VAEDecode/VAEEncode and tiled
decoding work unchanged.

Family: a LATENT does not say which model made it, so `auto` takes it from the MODEL when one is given
(its latent format names its TAESD decoder), else uses the only family installed. A family chosen by hand
that does not match the MODEL's latent format, and weights of the wrong shape (e.g. 16-channel TAESD3
files under a TAESD name), are refused with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import AcceleratorInputError, AcceleratorSpec, Availability

FAMILY_CHOICES = ("auto", "sd", "sdxl")
# family → (file prefix, latent scale ComfyUI's VAELoader uses, shift, what a person calls it)
FAMILIES = {
    "sd": ("taesd", 0.18215, 0.0, "SD1.x/SD2.x"),
    "sdxl": ("taesdxl", 0.13025, 0.0, "SDXL"),
}
PARTS = ("encoder", "decoder")
LATENT_CHANNELS = 4
DOWNLOAD_HINT = "the files are published in the madebyollin/taesd repository"


@dataclass
class TinyVAEConfig:
    vae_family: str = "auto"       # auto | sd | sdxl

    def __post_init__(self):
        if self.vae_family not in FAMILY_CHOICES:
            raise AcceleratorInputError(f"vae_family must be one of {', '.join(FAMILY_CHOICES)}, "
                                        f"got {self.vae_family!r}")


def vae_approx_folders() -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths("vae_approx")


def find_weights(family: str) -> tuple[dict[str, str], list[str]]:
    """({part: full path} found, [file stems missing]) for a family, matched as ComfyUI's VAELoader does."""
    import folder_paths

    prefix = FAMILIES[family][0]
    names = folder_paths.get_filename_list("vae_approx")
    found, missing = {}, []
    for part in PARTS:
        stem = f"{prefix}_{part}"
        match = next((name for name in names if name.startswith(stem + ".")), None)
        if match is None:
            missing.append(stem)
        else:
            found[part] = folder_paths.get_full_path_or_raise("vae_approx", match)
    return found, missing


def missing_files_message(family: str, missing: list[str]) -> str:
    folders = " or ".join(vae_approx_folders()) or "models/vae_approx"
    wanted = " and ".join(f"{stem}.safetensors (or .pth)" for stem in missing)
    return (f"Tiny VAE ({FAMILIES[family][3]}) needs {wanted} in {folders}; "
            f"{'it is' if len(missing) == 1 else 'they are'} missing ({DOWNLOAD_HINT})")


def model_family(model) -> str:
    """'sd' or 'sdxl' from a ModelPatcher's latent format; AcceleratorInputError for other latents."""
    latent_format = getattr(getattr(model, "model", None), "latent_format", None)
    if latent_format is None:
        raise AcceleratorInputError(f"Tiny VAE: the model input must be a MODEL; got {type(model).__name__}")
    decoder = getattr(latent_format, "taesd_decoder_name", None)
    for family, (prefix, *_rest) in FAMILIES.items():
        if decoder == f"{prefix}_decoder":
            return family
    raise AcceleratorInputError(
        f"Tiny VAE covers SD1.x/SD2.x and SDXL latents; this model's latent format is "
        f"{type(latent_format).__name__} (TAESD decoder {decoder or 'none'}), which it cannot decode")


def resolve_family(requested: str, model=None) -> str:
    """The family to load: `requested`, checked against the MODEL, or decided for `auto`."""
    TinyVAEConfig(requested)
    family_of_model = model_family(model) if model is not None else None
    if requested != "auto":
        if family_of_model is not None and family_of_model != requested:
            prefix, scale, _, title = FAMILIES[requested]
            other = FAMILIES[family_of_model]
            raise AcceleratorInputError(
                f"Tiny VAE: vae_family '{requested}' ({prefix}, {title}, latent scale {scale}) does not match "
                f"the connected MODEL, whose latents are {other[3]} (scale {other[1]}, {other[0]}): decoding "
                f"them would give wrong colours; choose '{family_of_model}' or 'auto'")
        return requested
    if family_of_model is not None:
        return family_of_model
    installed = [family for family in FAMILIES if not find_weights(family)[1]]
    if len(installed) == 1:
        return installed[0]
    if not installed:
        partial = [family for family in FAMILIES if len(find_weights(family)[1]) < len(PARTS)]
        if len(partial) == 1:  # half a pair installed: name the file that is missing
            raise AcceleratorInputError(missing_files_message(partial[0], find_weights(partial[0])[1]))
        stems = [f"{FAMILIES[f][0]}_{part}" for f in FAMILIES for part in PARTS]
        folders = " or ".join(vae_approx_folders()) or "models/vae_approx"
        raise AcceleratorInputError(f"Tiny VAE found no TAESD weights: put {', '.join(stems[:2])} (SD1.x/2.x) "
                                    f"or {', '.join(stems[2:])} (SDXL), as .safetensors or .pth, in {folders} "
                                    f"({DOWNLOAD_HINT})")
    raise AcceleratorInputError("Tiny VAE: vae_family 'auto' needs the model input connected, because both "
                                "taesd (SD1.x/2.x) and taesdxl (SDXL) are installed and a latent does not say "
                                "which model made it; connect the MODEL or choose 'sd' / 'sdxl'")


def check_weights(state: dict, part: str, family: str, source: str = "") -> None:
    """Refuses a state dict that is not a 4-channel TAESD encoder/decoder of ComfyUI's layout."""
    import torch
    from comfy.taesd.taesd import Decoder, Encoder

    with torch.device("meta"):
        reference = (Encoder if part == "encoder" else Decoder)(latent_channels=LATENT_CHANNELS).state_dict()
    where = f" ({source})" if source else ""
    # the decoder's first conv reads the latent; the encoder's last conv writes it
    latent_key = "1.weight" if part == "decoder" else f"{_last_conv_index(reference)}.weight"
    got = state.get(latent_key)
    if got is not None and got.ndim == 4:
        channels = got.shape[1] if part == "decoder" else got.shape[0]
        if channels != LATENT_CHANNELS:
            raise AcceleratorInputError(
                f"Tiny VAE: {FAMILIES[family][0]}_{part}{where} has {channels}-channel latents, but "
                f"{FAMILIES[family][3]} latents have {LATENT_CHANNELS}: these are weights of another family "
                f"(TAESD3/TAEF1 use 16), saved under the wrong name")
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong_shape = sorted(k for k in set(reference) & set(state) if tuple(state[k].shape) != tuple(reference[k].shape))
    if missing or unexpected or wrong_shape:
        detail = "; ".join(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong_shape)) if keys)
        raise AcceleratorInputError(f"Tiny VAE: {FAMILIES[family][0]}_{part}{where} is not a TAESD {part} "
                                    f"state dict ({detail})")


def _last_conv_index(reference: dict) -> int:
    return max(int(key.split(".")[0]) for key in reference)


def tiny_vae_state_dict(encoder: dict, decoder: dict, family: str) -> dict:
    """The state dict ComfyUI's VAELoader builds for `taesd`/`taesdxl` (prefixes + scale/shift)."""
    import torch

    _, scale, shift, _ = FAMILIES[family]
    state = {f"taesd_encoder.{k}": v for k, v in encoder.items()}
    state.update({f"taesd_decoder.{k}": v for k, v in decoder.items()})
    state["vae_scale"] = torch.tensor(scale)
    state["vae_shift"] = torch.tensor(shift)
    return state


def build_tiny_vae(encoder: dict, decoder: dict, family: str, device=None):
    """comfy.sd.VAE from TAESD encoder/decoder state dicts (checked first)."""
    import comfy.sd

    check_weights(encoder, "encoder", family)
    check_weights(decoder, "decoder", family)
    vae = comfy.sd.VAE(sd=tiny_vae_state_dict(encoder, decoder, family), device=device)
    vae.throw_exception_if_invalid()
    vae.accel_tiny_vae_family = family
    return vae


def load_tiny_vae(config: TinyVAEConfig, model=None):
    """The Tiny VAE of the configured (or the MODEL's) family from ComfyUI's models/vae_approx."""
    import comfy.utils

    family = resolve_family(config.vae_family, model)
    found, missing = find_weights(family)
    if missing:
        raise AcceleratorInputError(missing_files_message(family, missing))
    states = {}
    for part, path in found.items():
        states[part] = comfy.utils.load_torch_file(path, safe_load=True)
        check_weights(states[part], part, family, source=path)
    return build_tiny_vae(states["encoder"], states["decoder"], family)


def apply(model, config: TinyVAEConfig):
    """Spec entry point: a VAE (not a model); `model` may be None and is only read for the family."""
    return load_tiny_vae(config, model)


def _available() -> Availability:
    try:
        import folder_paths  # noqa: F401  (only inside ComfyUI)
    except ImportError:
        return Availability(True, "loads taesd_*/taesdxl_* from ComfyUI's models/vae_approx")
    # The code runs anywhere ComfyUI does; missing weights are a file to add, said in the reason.
    present = [FAMILIES[family][0] for family in FAMILIES if not find_weights(family)[1]]
    if present:
        return Availability(True, f"installed: {', '.join(present)}")
    folders = " or ".join(vae_approx_folders())
    return Availability(True, f"no weights yet: add taesd_encoder/taesd_decoder or taesdxl_encoder/"
                              f"taesdxl_decoder to {folders} ({DOWNLOAD_HINT})")


ACCELERATOR_SPECS = [AcceleratorSpec(
    name="taesd", title="Tiny VAE (TAESD)",
    description="Decodes/encodes with TAESD or TAESDXL instead of the full VAE: several times faster and far "
                "less memory, slightly softer images.",
    config=TinyVAEConfig, available=_available, apply=apply, kind="vae", lossless=False, order=70,
    not_idempotent="it returns a VAE, not a MODEL: there is no output to apply it to again")]
