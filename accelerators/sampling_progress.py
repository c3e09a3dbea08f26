"""Where a sampling run is, seen from inside a ComfyUI wrapper, for any sampler.

Samplers such as Heun, dpm_2 and the 2S family evaluate the model at sigmas between the schedule's
points, so exact float matching against `sample_sigmas` misses steps. The step of an evaluation is the
last schedule point whose sigma is >= the current sigma (within a relative tolerance).
"""
from __future__ import annotations

import torch


def step_of(sigma, sample_sigmas) -> tuple[int, int]:
    """(step index, total steps) for the model evaluation at `sigma` under the schedule `sample_sigmas`."""
    if sample_sigmas is None:
        return 0, 1
    sigmas = sample_sigmas.detach().float().cpu()
    total = max(len(sigmas) - 1, 1)
    value = float(sigma.detach().float().max().item() if torch.is_tensor(sigma) else sigma)
    at_or_above = (sigmas >= value * (1 - 1e-5)).nonzero()
    if len(at_or_above) == 0:
        return 0, total
    return min(int(at_or_above.max()), total - 1), total


def step_fraction(sigma, sample_sigmas) -> float:
    """The evaluated step as a fraction of the run: 0.0 for the first step, (n-1)/n for the last."""
    step, total = step_of(sigma, sample_sigmas)
    return step / total
