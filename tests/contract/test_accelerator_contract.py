"""The contract every accelerator in the registry keeps, checked on the real ComfyUI with the tiny SD1.5 model:

- applying it leaves the input MODEL as it was (wrappers, patches, options, weights), also after sampling;
- applying it to its own output is the same as applying it once, or its spec says why not;
- where it cannot run here, `available()` gives a reason, and `apply` runs eager with that reason under the
  `eager` fallback policy and raises BackendUnavailable under `error`;
- GET /accel/status lists it with the same availability.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tools.comfy_host import import_comfy, import_pack
from tools.model_factory import sample

import_comfy()
REGISTRY = import_pack().accelerators.registry
SPECS = REGISTRY.all_specs()


def _params() -> list:
    """One case per spec; sampling through a compile backend that runs here compiles, so those are slow."""
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if spec.kind == "backend" and spec.available() else [])
            for name, spec in SPECS.items()]


@pytest.fixture
def vae_approx(tmp_path, monkeypatch):
    """TAESD weights (random, ComfyUI's format) in a models/vae_approx of this test's own."""
    import folder_paths

    from tools.taesd_factory import write_taesd_files

    folder = tmp_path / "vae_approx"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.delitem(folder_paths.filename_list_cache, "vae_approx", raising=False)
    write_taesd_files(folder, "sd")
    return folder


def apply(spec, model, fallback="eager"):
    """The spec's `apply` with its default options (and the given fallback policy, for backends)."""
    if spec.kind == "backend":
        options = {**dataclasses.asdict(spec.config()), "fallback": fallback, "node_id": f"contract-{spec.name}"}
        return spec.apply(model, options)
    if spec.kind == "vae":
        return spec.apply(model, spec.config(vae_family="sd"))
    return spec.apply(model, spec.config())


def run(result, model):
    """What the accelerator's output does in a sampling run: a MODEL samples, a VAE decodes."""
    if hasattr(result, "model_options"):
        return sample(result, steps=2)
    latent = sample(model, steps=1)
    return result.decode(latent)


def patcher_state(model) -> dict:
    """What a ModelPatcher carries that an accelerator could change, comparable with ==."""
    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [shape(v) for v in value]
        return id(value) if callable(value) or torch.is_tensor(value) else repr(value)

    weights = [(name, float(p.detach().double().sum())) for name, p in model.model.named_parameters()]
    return {"wrappers": shape(model.wrappers), "callbacks": shape(model.callbacks),
            "model_options": shape(model.model_options), "patches": shape(model.patches),
            "object_patches": shape(model.object_patches), "weights": weights,
            "inplace": model.weight_inplace_update, "devices": (model.load_device, model.offload_device),
            "diffusion_model": id(model.model.diffusion_model)}


def structure(model) -> dict:
    """How many hooks of each kind and key a ModelPatcher carries (what a second apply must not double)."""
    def count(value):
        if isinstance(value, dict):
            return {k: count(v) for k, v in value.items()}
        return len(value) if isinstance(value, (list, tuple)) else type(value).__name__

    options = {k: count(v) for k, v in model.model_options.items() if k != "transformer_options"}
    transformer = model.model_options.get("transformer_options", {})
    return {"wrappers": count(model.wrappers), "callbacks": count(model.callbacks), "options": options,
            "transformer_options": {k: count(v) for k, v in transformer.items()}}


@pytest.fixture
def recorded():
    """The notices raised while a test runs."""
    from comfy_accel.accelerators import events

    seen = []
    listener = lambda event, data: seen.append(data) if event == "accel.notice" else None  # noqa: E731
    events.add_listener(listener)
    yield seen
    events.remove_listener(listener)


@pytest.mark.parametrize("name", _params())
def test_the_input_model_is_not_mutated(pack, tiny_sd15, vae_approx, name):
    spec = SPECS[name]
    before = patcher_state(tiny_sd15)
    result = apply(spec, tiny_sd15)
    assert result is not tiny_sd15
    assert patcher_state(tiny_sd15) == before, f"{name}: apply changed its input"
    out = run(result, tiny_sd15)
    assert torch.isfinite(out).all()
    assert patcher_state(tiny_sd15) == before, f"{name}: running the result changed the input"


@pytest.mark.parametrize("name", _params())
def test_applying_twice_is_applying_once_or_the_spec_says_why_not(pack, tiny_sd15, vae_approx, name):
    spec = SPECS[name]
    if spec.not_idempotent:
        pytest.skip(f"{name}: {spec.not_idempotent}")
    once = apply(spec, tiny_sd15)
    twice = apply(spec, once)
    assert structure(twice) == structure(once)
    assert torch.equal(run(twice, tiny_sd15), run(once, tiny_sd15))


@pytest.mark.parametrize("name", _params())
def test_where_it_cannot_run_it_says_why_and_follows_the_fallback_policy(pack, tiny_sd15, vae_approx, recorded,
                                                                         name):
    from comfy_accel.accelerators.base import BackendUnavailable

    spec = SPECS[name]
    ready = spec.available()
    assert isinstance(ready.ok, bool) and ready.reason, f"{name} gives no reason"
    if ready:
        pytest.skip(f"{name} runs here ({ready.reason}): no fallback to check")
    with pytest.raises(BackendUnavailable, match=ready.reason.split(" (")[0]):
        run(apply(spec, tiny_sd15, fallback="error"), tiny_sd15)
    eager = sample(tiny_sd15, steps=2)
    assert torch.equal(run(apply(spec, tiny_sd15, fallback="eager"), tiny_sd15), eager)
    assert any(ready.reason in notice["message"] and "eager" in notice["message"] for notice in recorded)


@pytest.mark.parametrize("name", list(SPECS))
def test_accel_status_lists_it(pack, name):
    from comfy_accel.nodes.routes import status_body

    rows = {row["name"]: row for row in status_body()["accelerators"]}
    assert name in rows
    ready = SPECS[name].available()
    assert (rows[name]["available"], rows[name]["reason"]) == (ready.ok, ready.reason)
    assert rows[name]["kind"] == SPECS[name].kind


def test_the_registry_is_what_status_shows(pack):
    from comfy_accel.nodes.routes import status_body

    listed = [row["name"] for row in status_body()["accelerators"]]
    assert listed == list(SPECS), "a module failed to import, or status lists something the registry does not"
