"""The compile session's AOTInductor packages (inductor+cudagraphs with COMFY_ACCEL_AOT_PACKAGES=aoti, or where
torch has no dynamo precompile; the default kind is tested in test_precompile.py) on the real ComfyUI, CPU: a session first
checks once per environment that a small package loads in a child process, then builds the UNet package once
and stores it; a new session of the same architecture loads it from the store and compiles nothing; calls with
patches never use a package (it bakes one forward); a probe or a package that a child process could not load is
recorded, and sessions use torch.compile without building another."""
import pytest
import torch

from tools.model_factory import build_model, unet_inputs


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_a_second_session_loads_the_stored_package_and_compiles_nothing(pack, tmp_path):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.aot_package import available
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compiled_unet import bucket_of, session_of
    from comfy_accel.accelerators.torch_compile import AOTI, INDUCTOR_AOT, apply

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
        session.compiler.use_packages(AOTI)
        assert session.uses_package({})
        call = session.graph_callable(unet, bucket_of(x, c, None), (x, t, c), {})
        runs.append((session, call(x, t, c), call))
    (first, out_first, _), (second, out_second, loaded) = runs
    assert [e["what"] for e in first.compiler.compile_events] == ["package probe", "unet package"]
    assert second.compiler.compile_events == [] and not second.package_failed
    assert torch.equal(out_first, out_second) and rel(out_first, reference) < 1e-4
    notes = [n["message"] for n in events.recent(20)]
    assert any("package" in n and "loaded from the cache" in n for n in notes), notes
    kinds = sorted(store.lookup_id(e.id).entry.meta.get("kind") for e in store.entries()
                   if e.accelerator == INDUCTOR_AOT)
    assert kinds == ["AOTInductor package", "record: AOTInductor packages load here"], kinds

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


@pytest.mark.slow
def test_a_probe_or_package_that_does_not_load_in_a_child_is_recorded_and_not_built_again(pack, tmp_path,
                                                                                          monkeypatch):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.aot_package import available
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compiled_unet import PACKAGE_PROBE, UNUSABLE_PACKAGE, bucket_of, session_of
    from comfy_accel.accelerators.torch_compile import AOTI, INDUCTOR_AOT, apply

    ready = available()
    if not ready:
        pytest.skip(ready.reason)
    model = build_model("tiny-sd15", seed=43)
    unet = model.model.diffusion_model
    x, t, c = unet_inputs(model, batch=2)[:3]
    bucket = bucket_of(x, c, None)

    def sessions_with(store):
        made = []
        for _ in range(2):
            session = session_of(apply(model, {"fallback": "error", "store": store}))
            session.compiler.use_packages(AOTI)
            call = session.graph_callable(unet, bucket, (x, t, c), {})
            assert session.package_failed and not session.packages and not session.uses_package({})
            assert not hasattr(call, "loader")   # the module compiled by torch.compile (compiles on its first call)
            made.append(session)
        return made

    def kinds(store):
        return sorted(store.lookup_id(e.id).entry.meta.get("kind") for e in store.entries())

    # a child that cannot finish in time is one way to fail; a loader crash (SIGSEGV) is handled the same way.
    # 1. the environment probe fails: no UNet package is built, now or by the next session
    monkeypatch.setenv("COMFY_ACCEL_AOT_VERIFY_TIMEOUT_S", "0.05")
    store = ArtifactStore(tmp_path / "probe-fails")
    first, second = sessions_with(store)
    assert "a test package did not load here" in first.package_failed and "did not finish in 0.05 s" in \
        first.package_failed
    assert [e["what"] for e in first.compiler.compile_events] == ["package probe"]
    assert second.compiler.compile_events == []   # the probe's record in the cache: no probe, no build
    assert "recorded in the cache" in second.package_failed and "did not finish" in second.package_failed
    assert kinds(store) == ["record: AOTInductor packages do not load here"]
    notes = [n["message"] for n in events.recent(30)]
    assert any("checking once that ahead-of-time packages load" in n for n in notes), notes
    assert any("no ahead-of-time package for the UNet" in n and "using torch.compile" in n for n in notes), notes

    # 2. the probe passes but the UNet's own package does not load: recorded for the architecture
    store = ArtifactStore(tmp_path / "package-fails")
    monkeypatch.delenv("COMFY_ACCEL_AOT_VERIFY_TIMEOUT_S")
    probing = session_of(apply(model, {"fallback": "error", "store": store}))
    probing.compiler.use_packages(AOTI)
    assert probing.package_environment_problem(store, bucket, x) == ""
    monkeypatch.setenv("COMFY_ACCEL_AOT_VERIFY_TIMEOUT_S", "0.05")
    first, second = sessions_with(store)
    assert "did not finish in 0.05 s" in first.package_failed and "test package" not in first.package_failed
    assert [e["what"] for e in first.compiler.compile_events] == ["unet package"]   # the probe's record: passed
    assert second.compiler.compile_events == []
    assert "recorded in the cache" in second.package_failed and "did not finish" in second.package_failed
    assert kinds(store) == ["record: AOTInductor packages do not load here", "record: AOTInductor packages load here"]

    # the records cover every shape (a load failure is not about one shape); the probe's every architecture too
    other = bucket_of(torch.zeros(1, 4, 16, 16), torch.zeros(1, 154, c.shape[-1]), None)
    assert first.package_key(other, UNUSABLE_PACKAGE).id == first.package_key(bucket, UNUSABLE_PACKAGE).id
    assert first.package_key(other).id != first.package_key(bucket).id
    sdxl = session_of(apply(build_model("tiny-sdxl", seed=1), {"fallback": "error", "store": store}))
    sdxl.compiler.use_packages(AOTI)
    assert sdxl.package_key(bucket, PACKAGE_PROBE).id == first.package_key(bucket, PACKAGE_PROBE).id
    assert sdxl.package_key(bucket, UNUSABLE_PACKAGE).id != first.package_key(bucket, UNUSABLE_PACKAGE).id


def test_without_an_artifact_cache_no_package_is_built(pack):
    """A package only pays off in a later process, through the cache: with none (e.g. a read-only disk) the
    session compiles with torch.compile at once instead of spending a build, and says why."""
    from comfy_accel.accelerators.compiled_unet import bucket_of, session_of
    from comfy_accel.accelerators.torch_compile import AOTI, INDUCTOR_AOT, apply

    model = build_model("tiny-sd15", seed=45)
    unet = model.model.diffusion_model
    x, t, c = unet_inputs(model, batch=2)[:3]
    session = session_of(apply(model, {"fallback": "error", "store": None}))
    session.compiler.use_packages(AOTI)
    call = session.graph_callable(unet, bucket_of(x, c, None), (x, t, c), {})
    assert not hasattr(call, "loader") and session.compiler.compile_events == []
    assert session.package_failed == "PackageUnusable: no artifact cache to keep it in"


def test_packages_are_on_unless_switched_off_precompile_first(pack, monkeypatch):
    from comfy_accel.accelerators.aot_package import available as aoti_available
    from comfy_accel.accelerators.precompile import available as precompile_available
    from comfy_accel.accelerators.torch_compile import AOTI, PRECOMPILE, package_kind, packages_enabled

    expected_default = PRECOMPILE if precompile_available() else (AOTI if aoti_available() else "")
    monkeypatch.delenv("COMFY_ACCEL_AOT_PACKAGES", raising=False)
    assert package_kind() == expected_default and packages_enabled() == bool(expected_default)
    for off in ("0", "off", "false"):
        monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", off)
        assert package_kind() == "" and not packages_enabled()
    for default in ("1", "auto"):
        monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", default)
        assert package_kind() == expected_default
    monkeypatch.setenv("COMFY_ACCEL_AOT_PACKAGES", "aoti")
    assert package_kind() == (AOTI if aoti_available() else "")
