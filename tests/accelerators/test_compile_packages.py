"""The compile session's AOTInductor packages (opt-in for inductor+cudagraphs) on the real ComfyUI, CPU: a
session builds the package once and stores it; a new session of the same architecture loads it from the
store and compiles nothing; calls with patches never use a package (it bakes one forward)."""
import pytest
import torch

from tools.model_factory import build_model, unet_inputs


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_second_session_loads_the_stored_package_and_compiles_nothing(pack, tmp_path):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.aot_package import available
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compiled_unet import bucket_of, session_of
    from comfy_accel.accelerators.torch_compile import INDUCTOR_AOT, apply

    ready = available()
    if not ready:
        pytest.skip(ready.reason)
    model = build_model("tiny-sd15", seed=41)
    unet = model.model.diffusion_model
    x, t, c = unet_inputs(model, batch=2)[:3]
    with torch.no_grad():
        reference = unet(x, t, context=c, transformer_options={})
    store = ArtifactStore(tmp_path / "cache")
    runs = []
    for _ in range(2):
        session = session_of(apply(model, {"fallback": "error", "store": store}))
        # what COMFY_ACCEL_AOT_PACKAGES=1 sets for inductor+cudagraphs (a GPU backend); the session logic is the same
        session.compiler.package_accelerator = INDUCTOR_AOT
        assert session.uses_package({})
        call = session.graph_callable(unet, bucket_of(x, c, None), (x, t, c), {})
        runs.append((session, call(x, t, c)))
    (first, out_first), (second, out_second) = runs
    assert [e["what"] for e in first.compiler.compile_events] == ["unet package"]
    assert second.compiler.compile_events == [] and not second.package_failed
    assert torch.equal(out_first, out_second) and rel(out_first, reference) < 1e-4
    notes = [n["message"] for n in events.recent(20)]
    assert any("package" in n and "loaded from the cache" in n for n in notes), notes
    assert [e.accelerator for e in store.entries()].count(INDUCTOR_AOT) == 1

    def freeu_like(h, hsp, options):
        return h, hsp

    assert not second.uses_package({"patches": {"output_block_patch": [freeu_like]}})


def test_packages_are_opt_in(pack, monkeypatch):
    from comfy_accel.accelerators.aot_package import available
    from comfy_accel.accelerators.torch_compile import packages_enabled

    monkeypatch.delenv("COMFY_ACCEL_AOT_PACKAGES", raising=False)
    assert not packages_enabled()
    monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", "1")
    assert packages_enabled() == bool(available())
    monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", "0")
    assert not packages_enabled()
