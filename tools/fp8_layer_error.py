"""Measures what fp8 with row-wise scales costs each linear layer, to decide which stay in the model's dtype
(accelerators/compile/fp8.py KEEP). CPU, tiny random-weight models built with ComfyUI's own classes:

- per layer: the relative error of its fp8 output (`fp8.fp8_linear`) against its float32 output, on the
  inputs it receives during a real sampling step, grouped by layer role (block indices folded);
- end to end: the final latent's relative error against float32 with every eligible Linear in fp8, and with
  the family's KEEP list applied;
- with a LoRA (`--lora`, the UNets): the final latent of the GPU test's sample (seed 4, 4 steps, 128², cfg 7;
  tests/accelerators/test_fp8_gpu.py) against the model's dtype, plain and with its random LoRA, fp8 computed
  from the live (patched) weights at every call: the reference for that test's bounds.

    .venv/bin/python -m tools.fp8_layer_error [tiny-flux-dev tiny-sd15 ...]
    .venv/bin/python -m tools.fp8_layer_error --lora [tiny-sd15 tiny-sdxl]
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict

import torch

DEFAULT = ("tiny-sd15", "tiny-sdxl", "tiny-flux-dev", "tiny-wan21", "tiny-sd3")


def _build(name: str):
    if name in ("tiny-sd15", "tiny-sdxl"):
        from tools.model_factory import build_model, sample

        return build_model(name, seed=3), lambda m, steps: sample(m, steps=steps)
    from tools.dit_factory import build_dit, sample_dit

    return build_dit(name, seed=3), lambda m, steps: sample_dit(m, steps=steps)


def layer_errors(patcher, run) -> dict[str, float]:
    """Role → worst relative error of fp8 against float32 over that role's layers and calls."""
    from comfy_accel.accelerators.compile.fp8 import fp8_linear, quantize_rows

    dm = patcher.model.diffusion_model
    worst: dict[str, float] = defaultdict(float)
    hooks = []

    def hook(name):
        def measure(module, args, output):
            x = args[0]
            if module.in_features % 16 or module.out_features % 16:
                return
            w8, ws = quantize_rows(module.weight.detach())
            approx = fp8_linear(x.float(), w8, ws.reshape(1, -1), module.bias)
            exact = torch.nn.functional.linear(x.float(), module.weight.float(), module.bias)
            err = ((approx - exact).norm() / exact.norm().clamp(min=1e-12)).item()
            role = role_of(name)
            worst[role] = max(worst[role], err)
        return measure

    for name, module in dm.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            run(patcher, 1)
    finally:
        for h in hooks:
            h.remove()
    return dict(worst)


def fp8_from_live_weights(patcher, names) -> list:
    """An independent eager reference: the named Linears' outputs replaced by fp8 of their live (patched) weights,
    quantized again at every call (no cached copies, no routing). Returns the hooks' handles."""
    from comfy_accel.accelerators.compile.fp8 import fp8_linear, quantize_rows

    def hook(module, args, output):
        w8, scale = quantize_rows(module.weight.detach())
        return fp8_linear(args[0], w8, scale.reshape(1, -1), module.bias)

    dm = patcher.model.diffusion_model
    return [dm.get_submodule(name).register_forward_hook(hook) for name in names]


def role_of(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", f".{name}.").strip(".")


def _routes(patcher, keep: dict | None = None):
    """The model's fp8 routing on the CPU (every Linear of the model eligible, not only the blocks), under the KEEP
    lists `keep` (None: nothing kept)."""
    from types import SimpleNamespace

    from comfy_accel.accelerators.compile import fp8

    saved = dict(fp8.KEEP)
    fp8.KEEP.update(keep if keep is not None else {k: () for k in fp8.KEEP})
    try:
        session = SimpleNamespace(served=None, graphs=None, notice=lambda *a, **k: None)
        weights = fp8.Fp8Weights(session, "cpu")
        weights.refresh(patcher.model, patcher.model.diffusion_model, {})
    finally:
        fp8.KEEP.update(saved)
    return weights


def role_sensitivity(name: str, steps: int = 4) -> dict[str, float]:
    """Role → the final latent's relative error against float32 when only that role's layers run in fp8."""
    patcher, run = _build(name)
    reference = run(patcher, steps)
    weights = _routes(patcher)
    every = dict(weights.routes)
    out = {}
    for role in sorted({role_of(n) for n in every}):
        weights.routes = {n: r for n, r in every.items() if role_of(n) == role}
        with weights.routed():
            latent = run(patcher, steps)
        out[role] = ((latent - reference).norm() / reference.norm()).item()
    return out


def end_to_end(name: str, steps: int = 4) -> dict:
    """Final latent's relative error against float32, every Linear of the model (not only the blocks) eligible:
    all of them in fp8, and with KEEP applied."""
    from comfy_accel.accelerators.compile import fp8

    out = {}
    patcher, run = _build(name)
    reference = run(patcher, steps)
    for label, keep in (("all layers fp8", None), ("KEEP applied", dict(fp8.KEEP))):
        weights = _routes(patcher, keep)
        with weights.routed():
            latent = run(patcher, steps)
        out[label] = (((latent - reference).norm() / reference.norm()).item(), len(weights.routes))
    return out


def lora_case(name: str) -> dict:
    """The GPU test's fp8-vs-dtype error, plain and with its LoRA (tools.model_factory.random_lora over attention
    and feed-forward layers), float32."""
    from comfy_accel.accelerators.compile import fp8
    from tests.lora import with_lora
    from tools.model_factory import build_model, random_lora, sample

    plain, quantized = build_model(name, seed=4), build_model(name, seed=4, check_alive=False)
    handles = fp8_from_live_weights(quantized, [n for n, _ in fp8.candidate_layers(quantized.model.diffusion_model,
                                                                                     None)])
    run = lambda m: sample(m, steps=4, width=128, height=128)   # noqa: E731
    lora = random_lora(plain, feed_forward=True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()   # noqa: E731
    try:
        return {"plain": rel(run(quantized), run(plain)),
                "with LoRA": rel(run(with_lora(quantized, lora)), run(with_lora(plain, lora)))}
    finally:
        for handle in handles:
            handle.remove()


def main(names) -> None:
    from tools.comfy_host import import_pack

    import_pack()
    if names and names[0] == "--lora":
        for name in names[1:] or ("tiny-sd15", "tiny-sdxl"):
            print(f"== {name}: fp8 against the model's dtype, final latent (the GPU test's sample): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in lora_case(name).items()))
        return
    for name in names:
        patcher, run = _build(name)
        errors = layer_errors(patcher, run)
        alone = role_sensitivity(name)
        kept = _fp8().keep_patterns(type(patcher.model.diffusion_model).__name__)
        print(f"== {name}: per layer role (K = kept by KEEP): the layer's own fp8 error (worst call), and the final "
              f"latent's error (4 steps) with only that role in fp8")
        for role, err in sorted(alone.items(), key=lambda kv: -kv[1]):
            mark = "K" if any(p.search(role.replace(".N.", ".0.")) for p in kept) else "-"
            print(f"  {mark} layer {errors.get(role, float('nan')):7.4f}  final {err:7.4f}  {role}")
        for label, (err, routed) in end_to_end(name).items():
            print(f"  final latent, 4 steps, {label} ({routed} layers routed): rel {err:.4f}")


def _fp8():
    from comfy_accel.accelerators.compile import fp8

    return fp8


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
