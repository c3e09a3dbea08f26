"""OneDiff and Stable Fast behind the same node: detection with reasons, our options mapped to theirs, and the
fallback when the library is missing. The compile itself runs where the library imports (skipped otherwise:
neither has a build for this torch on this workplace, see HOST.md)."""
import importlib.util

import pytest
import torch

from tools.model_factory import sample


def _missing(module):
    return importlib.util.find_spec(module) is None


def test_availability_names_what_is_missing(pack):
    from comfy_accel.accelerators.compile import onediff, stable_fast

    for module, found, pip in ((onediff, not _missing("onediff"), "onediff"),
                               (stable_fast, not _missing("sfast"), "stable-fast")):
        ready = module.available()
        if not found:
            assert not ready and f"{pip} not installed" in ready.reason
        elif not torch.cuda.is_available():
            assert not ready and ("CUDA GPU" in ready.reason or "neither of its compilers" in ready.reason)


def test_our_options_map_to_theirs(pack):
    from comfy_accel.accelerators.compile.onediff import onediff_options
    from comfy_accel.accelerators.compile.stable_fast import sfast_flags

    nexfort = onediff_options("nexfort", "default", "buckets")
    assert nexfort["mode"].startswith("max-optimize") and "freezing=False" in nexfort["mode"]
    assert "cudagraphs" not in nexfort["mode"] and nexfort["dynamic"] is False
    assert "low-precision" in onediff_options("nexfort", "max-autotune", "dynamic")["mode"]
    assert onediff_options("oneflow", "default", "dynamic") == {"dynamic": True}
    with pytest.raises(ValueError, match="unknown OneDiff backend"):
        onediff_options("tvm", "default", "buckets")
    flags = sfast_flags("default", has_xformers=True, has_triton=True)
    assert flags["enable_jit_freeze"] is False          # freezing bakes the weights: LoRA would not apply
    assert flags["enable_cuda_graph"] is False          # our own graphs sit in front
    assert flags["enable_xformers"] is True and flags["enable_triton"] is False
    assert sfast_flags("max-autotune", has_xformers=False, has_triton=True)["enable_triton"] is True


@pytest.mark.parametrize("name", ["onediff", "stable-fast"])
def test_missing_backend_runs_eager_with_the_reason_or_refuses(pack, tiny_sd15, name):
    from comfy_accel.accelerators import events, registry
    from comfy_accel.accelerators.base import BackendUnavailable

    spec = registry.get(name)
    ready = spec.available()
    if ready:
        pytest.skip(f"{name} is available here: the fallback path is not what runs")
    with pytest.raises(BackendUnavailable, match=ready.reason.split(" (")[0]):
        spec.apply(tiny_sd15, {"fallback": "error"})
    plain = spec.apply(tiny_sd15, {"fallback": "eager", "node_id": f"m-{name}"})
    assert torch.equal(sample(plain, steps=2), sample(tiny_sd15, steps=2))
    assert any(n["node"] == f"m-{name}" and n["message"] == f"{ready.reason}; running eager"
               for n in events.recent(100))


@pytest.mark.parametrize("name", ["onediff", "stable-fast"])
def test_compiles_and_matches_eager_where_the_library_runs(pack, name):
    from comfy_accel.accelerators import registry
    from tools.model_factory import build_model

    spec = registry.get(name)
    ready = spec.available()
    if not ready:
        pytest.skip(f"{name}: {ready.reason}")
    model = build_model("tiny-sd15", dtype=torch.float16, device="cuda", seed=4)
    eager = sample(model, steps=3)
    out = sample(spec.apply(model, {"fallback": "error"}), steps=3)
    assert ((out - eager).norm() / eager.norm()).item() < 1e-2
