"""Engine shape profiles: presets, explicit min/opt/max validation, and picking the profile for a request.

A TensorRT engine is built for one or more optimization profiles; each gives min/opt/max for every dynamic
dimension. Here a profile is stated the way a user thinks of it — batch, image height and width in pixels,
prompt length in tokens — and converted to the UNet's tensor shapes (latent = pixels / 8) only when the
engine is built. `select_profile` returns the tightest profile that covers a request, or None and one line
that names the dimension that missed and the ranges the engine has (the "no valid profile" users of the
older TensorRT nodes could not decode).

Presets hold two profiles where CFG cutoff matters: a batch-1 profile (after the cutoff, or cfg 1) and a
batch 2..N profile (cond + uncond), each with its own `opt`, so both halves of a run use tuned kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..base import AcceleratorInputError

DIMS = ("batch", "height", "width", "tokens")
LATENT_SCALE = 8          # SD/SDXL VAEs: one latent pixel per 8×8 image pixels
TOKENS_PER_CHUNK = 77     # one CLIP window; ComfyUI concatenates windows for long prompts
LIMITS = {"batch": (1, 64), "height": (64, 4096), "width": (64, 4096), "tokens": (1, 77 * 12)}


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def covers(self, value: int) -> bool:
        return self.min <= value <= self.max

    @property
    def span(self) -> int:
        return self.max - self.min

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def text(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}..{self.max}"


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile, in batch / pixels / tokens."""
    batch: Range
    height: Range
    width: Range
    tokens: Range

    def covers(self, request: Mapping[str, int]) -> bool:
        return not self.misses(request)

    def misses(self, request: Mapping[str, int]) -> list[str]:
        return [f"{dim} {request[dim]} outside {getattr(self, dim).text()}"
                for dim in DIMS if dim in request and not getattr(self, dim).covers(int(request[dim]))]

    def volume(self) -> int:
        """Largest activation the profile admits (batch·height·width·tokens at max): smaller is faster."""
        return self.batch.max * self.height.max * self.width.max * self.tokens.max

    def as_dict(self) -> dict:
        return {dim: getattr(self, dim).as_list() for dim in DIMS}

    def envelope(self) -> dict:
        return {dim: [getattr(self, dim).min, getattr(self, dim).max] for dim in DIMS}

    def describe(self) -> str:
        return (f"batch {self.batch.text()}, {self.width.text()}×{self.height.text()} px, "
                f"{self.tokens.text()} tokens")

    def tensor_shapes(self, context_dim: int, adm_channels: int = 0, in_channels: int = 4) -> dict:
        """{input name: (min, opt, max) shapes} of the UNet export (names: export.INPUT_NAMES)."""
        def shapes(make):
            return tuple(make(i) for i in range(3))

        def pick(r: Range, i: int) -> int:
            return (r.min, r.opt, r.max)[i]

        out = {
            "x": shapes(lambda i: (pick(self.batch, i), in_channels, pick(self.height, i) // LATENT_SCALE,
                                   pick(self.width, i) // LATENT_SCALE)),
            "timesteps": shapes(lambda i: (pick(self.batch, i),)),
            "context": shapes(lambda i: (pick(self.batch, i), pick(self.tokens, i), context_dim)),
        }
        if adm_channels:
            out["y"] = shapes(lambda i: (pick(self.batch, i), adm_channels))
        return out


def make_range(name: str, low, opt, high, multiple: int = 1) -> Range:
    """A validated Range: whole numbers within the dimension's limits, min <= opt <= max, multiples kept."""
    values = []
    for label, value in (("min", low), ("opt", opt), ("max", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise AcceleratorInputError(f"{name} {label} must be a whole number, got {value!r}")
        values.append(int(value))
    low, opt, high = values
    lo_limit, hi_limit = LIMITS[name]
    for label, value in (("min", low), ("opt", opt), ("max", high)):
        if not lo_limit <= value <= hi_limit:
            raise AcceleratorInputError(f"{name} {label} must be between {lo_limit} and {hi_limit}, got {value}")
    if not low <= opt <= high:
        raise AcceleratorInputError(f"{name} needs min <= opt <= max, got min {low}, opt {opt}, max {high}")
    if multiple > 1:
        bad = [f"{label} {v}" for label, v in (("min", low), ("opt", opt), ("max", high)) if v % multiple]
        if bad:
            raise AcceleratorInputError(f"{name} must be a multiple of {multiple} pixels (the latent is 1/8 of "
                                        f"the image); got {', '.join(bad)}")
    return Range(low, opt, high)


def make_profile(batch: Sequence, height: Sequence, width: Sequence, tokens: Sequence) -> EngineProfile:
    """From (min, opt, max) triples (or a single int for a static dimension)."""
    def triple(value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value, value, value
        if isinstance(value, Mapping):
            return value.get("min"), value.get("opt"), value.get("max")
        value = list(value)
        if len(value) == 2:
            return value[0], value[0], value[1]
        if len(value) != 3:
            raise AcceleratorInputError(f"a profile range is (min, opt, max); got {value!r}")
        return tuple(value)

    return EngineProfile(batch=make_range("batch", *triple(batch)),
                         height=make_range("height", *triple(height), multiple=LATENT_SCALE),
                         width=make_range("width", *triple(width), multiple=LATENT_SCALE),
                         tokens=make_range("tokens", *triple(tokens)))


def profile_from_dict(data: Mapping) -> EngineProfile:
    missing = [dim for dim in DIMS if dim not in data]
    if missing:
        raise AcceleratorInputError(f"profile lacks {', '.join(missing)}; it needs {', '.join(DIMS)}")
    return make_profile(*(data[dim] for dim in DIMS))


def static_profile(batch: int, height: int, width: int, tokens: int = TOKENS_PER_CHUNK) -> EngineProfile:
    return make_profile(batch, height, width, tokens)


def _cfg_pair(height, width, tokens=(77, 77, 154), max_batch: int = 4) -> list[EngineProfile]:
    """Batch 1 (after CFG cutoff / cfg 1) and batch 2..max_batch (cond + uncond), same image sizes."""
    return [make_profile((1, 1, 1), height, width, tokens),
            make_profile((2, 2, max_batch), height, width, tokens)]


# name → profiles. Sizes are pixels; tokens 77·k (long prompts: up to 154).
PRESETS: dict[str, list[EngineProfile]] = {
    "512x512 (SD1.5)": _cfg_pair((512, 512, 512), (512, 512, 512)),
    "512 dynamic 256-768 (SD1.5)": _cfg_pair((256, 512, 768), (256, 512, 768)),
    "768x768 (SD2.x)": _cfg_pair((768, 768, 768), (768, 768, 768)),
    "hires fix 512-1024 (SD1.5)": _cfg_pair((512, 768, 1024), (512, 768, 1024)),
    "1024x1024 (SDXL)": _cfg_pair((1024, 1024, 1024), (1024, 1024, 1024)),
    "SDXL dynamic 768-1344": _cfg_pair((768, 1024, 1344), (768, 1024, 1344)),
    "hires fix 1024-1536 (SDXL)": _cfg_pair((1024, 1280, 1536), (1024, 1280, 1536)),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str) -> list[EngineProfile]:
    if name not in PRESETS:
        raise AcceleratorInputError(f"unknown TensorRT profile preset {name!r}; presets: {', '.join(PRESETS)}")
    return list(PRESETS[name])


def validate_profiles(profiles: Iterable) -> list[EngineProfile]:
    out = [p if isinstance(p, EngineProfile) else profile_from_dict(p) for p in profiles]
    if not out:
        raise AcceleratorInputError("a TensorRT engine needs at least one profile")
    if len(out) > 8:
        raise AcceleratorInputError(f"at most 8 profiles per engine (each adds build time); got {len(out)}")
    return out


def profile_for_request(request: Mapping[str, int], dynamic: bool = True) -> list[EngineProfile]:
    """Profiles built on demand for a request no engine covers: static at its shape, or a range around it
    (batch 1 and 2..max(2, b) for CFG; sizes from 3/4 to 3/2 of the request, 77-token windows)."""
    b, h, w, t = (int(request[d]) for d in DIMS)
    windows = max(1, -(-t // TOKENS_PER_CHUNK))
    if not dynamic:
        return [static_profile(b, h, w, t)]

    def around(v: int) -> tuple[int, int, int]:
        low = max(LIMITS["height"][0], (v * 3 // 4) // 64 * 64)
        high = min(LIMITS["height"][1], -(-(v * 3 // 2) // 64) * 64)
        return min(low, v), v, max(high, v)

    tokens = (min(t, TOKENS_PER_CHUNK), t, max(t, TOKENS_PER_CHUNK * max(2, windows)))
    return [make_profile((1, 1, 1), around(h), around(w), tokens),
            make_profile((2, max(2, b), max(4, b)), around(h), around(w), tokens)]


def request_of(x_shape: Sequence[int], context_shape: Sequence[int] | None) -> dict:
    """The UNet call (x: B×C×H×W latent, context: B×T×D) as a profile request in batch / pixels / tokens."""
    return {"batch": int(x_shape[0]), "height": int(x_shape[2]) * LATENT_SCALE,
            "width": int(x_shape[3]) * LATENT_SCALE, "tokens": int(context_shape[1]) if context_shape else 0}


def describe_request(request: Mapping[str, int]) -> str:
    return (f"batch {request['batch']}, {request['width']}×{request['height']} px, "
            f"{request['tokens']} tokens")


def select_profile(profiles: Sequence[EngineProfile], request: Mapping[str, int]):
    """(index, profile, "") of the tightest profile covering `request`, or (None, None, why none does).

    Tightest = smallest max volume, then the opt nearest the request: the profile whose kernels were tuned
    closest to this shape. The reason names each profile's first miss, e.g.
    "no engine profile covers batch 2, 768×768 px, 77 tokens: profile 1 height 768 outside 512; ...".
    """
    covering = [(p.volume(), _opt_distance(p, request), i) for i, p in enumerate(profiles) if p.covers(request)]
    if covering:
        _, _, index = min(covering)
        return index, profiles[index], ""
    if not profiles:
        return None, None, f"no engine profile covers {describe_request(request)}: the engine has none"
    misses = "; ".join(f"profile {i + 1} {', '.join(p.misses(request))}" for i, p in enumerate(profiles))
    return None, None, f"no engine profile covers {describe_request(request)}: {misses}"


def _opt_distance(profile: EngineProfile, request: Mapping[str, int]) -> int:
    return sum(abs(getattr(profile, dim).opt - int(request[dim])) for dim in DIMS if dim in request)


def envelope(profiles: Sequence[EngineProfile]) -> dict:
    """{dim: [min, max]} over all profiles: the artifact key's profile field (cache `get_covering`)."""
    return {dim: [min(getattr(p, dim).min for p in profiles), max(getattr(p, dim).max for p in profiles)]
            for dim in DIMS}
