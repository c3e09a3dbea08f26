"""The compile session's AOTInductor packages (inductor+cudagraphs) on the real ComfyUI, CPU: a session builds
the package once and stores it; a new session of the same architecture loads it from the store and compiles
nothing; calls with patches never use a package (it bakes one forward); a package that a child process could
not load is recorded, and sessions use torch.compile without building another."""
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
        # what inductor+cudagraphs (a GPU backend) sets; the session logic is the same
        session.compiler.package_accelerator = INDUCTOR_AOT
        assert session.uses_package({})
        call = session.graph_callable(unet, bucket_of(x, c, None), (x, t, c), {})
        runs.append((session, call(x, t, c), call))
    (first, out_first, _), (second, out_second, loaded) = runs
    assert [e["what"] for e in first.compiler.compile_events] == ["unet package"]
    assert second.compiler.compile_events == [] and not second.package_failed
    assert torch.equal(out_first, out_second) and rel(out_first, reference) < 1e-4
    notes = [n["message"] for n in events.recent(20)]
    assert any("package" in n and "loaded from the cache" in n for n in notes), notes
    assert [e.accelerator for e in store.entries()].count(INDUCTOR_AOT) == 1

    def freeu_like(h, hsp, options):
        return h, hsp

    assert not second.uses_package({"patches": {"output_block_patch": [freeu_like]}})

    # a package that loads but fails in this process (its CUDA graph capture, on a GPU): torch.compile from then on
    bucket = bucket_of(x, c, None)
    assert not second.drop_package(bucket, lambda *a: None, RuntimeError("not the package"))
    assert second.drop_package(bucket, loaded, RuntimeError("capture failed"))
    assert second.packages == {} and second.package_failed == "RuntimeError: capture failed"
    assert not second.uses_package({})
    assert not hasattr(second.graph_callable(unet, bucket, (x, t, c), {}), "loader")


def test_a_package_that_does_not_load_in_a_child_is_recorded_and_not_built_again(pack, tmp_path, monkeypatch):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.aot_package import available
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compiled_unet import bucket_of, session_of
    from comfy_accel.accelerators.torch_compile import INDUCTOR_AOT, apply

    ready = available()
    if not ready:
        pytest.skip(ready.reason)
    # a child that cannot finish in time is one way to fail; a loader crash (SIGSEGV) is handled the same way
    monkeypatch.setenv("COMFY_ACCEL_AOT_VERIFY_TIMEOUT_S", "0.05")
    model = build_model("tiny-sd15", seed=43)
    unet = model.model.diffusion_model
    x, t, c = unet_inputs(model, batch=2)[:3]
    store = ArtifactStore(tmp_path / "cache")
    sessions = []
    for _ in range(2):
        session = session_of(apply(model, {"fallback": "error", "store": store}))
        session.compiler.package_accelerator = INDUCTOR_AOT
        call = session.graph_callable(unet, bucket_of(x, c, None), (x, t, c), {})
        assert session.package_failed and not session.packages and not session.uses_package({})
        assert not hasattr(call, "loader")   # the module compiled by torch.compile (compiles on its first call)
        sessions.append(session)
    first, second = sessions
    assert "did not finish in 0.05 s" in first.package_failed
    assert [e["what"] for e in first.compiler.compile_events] == ["unet package"]
    assert second.compiler.compile_events == []   # the record in the cache: no second build
    assert "recorded in the cache" in second.package_failed and "did not finish" in second.package_failed
    notes = [n["message"] for n in events.recent(20)]
    assert any("no ahead-of-time package for the UNet" in n and "using torch.compile" in n for n in notes), notes
    kinds = [store.lookup_id(e.id).entry.meta.get("kind") for e in store.entries()]
    assert kinds == ["record: AOTInductor packages do not load here"], kinds


def test_packages_are_on_unless_switched_off(pack, monkeypatch):
    from comfy_accel.accelerators.aot_package import available
    from comfy_accel.accelerators.torch_compile import packages_enabled

    monkeypatch.delenv("COMFY_ACCEL_AOT_PACKAGES", raising=False)
    assert packages_enabled() == bool(available())
    for off in ("0", "off", "false"):
        monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", off)
        assert not packages_enabled()
    monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", "1")
    assert packages_enabled() == bool(available())
