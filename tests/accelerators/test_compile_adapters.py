"""OneDiff and Stable Fast behind the same node: our options mapped to theirs, and the compile where the library
imports (skipped otherwise: neither has a build for this torch on this workplace, see HOST.md). Their
availability reasons and the fallback without the library: tests/contract/test_accelerator_contract.py."""
import pytest
import torch


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
def test_compiles_and_matches_eager_where_the_library_runs(pack, name):
    from comfy_accel.accelerators import registry
    from tools.model_factory import build_model, sample

    spec = registry.get(name)
    ready = spec.available()
    if not ready:
        pytest.skip(f"{name}: {ready.reason}")
    model = build_model("tiny-sd15", dtype=torch.float16, device="cuda", seed=4)
    eager = sample(model, steps=3)
    out = sample(spec.apply(model, {"fallback": "error"}), steps=3)
    assert ((out - eager).norm() / eager.norm()).item() < 1e-2
