"""Real TensorRT: build (cached, refittable, no ONNX kept), run through the sampler, LoRA by refit, restore.

Runs only where `tensorrt` and a CUDA GPU are present; elsewhere every test is skipped with that reason.
"""
import pytest
import torch

from tools.model_factory import build_model, sample


def _skip_reason():
    from accelerators.base import module_available

    if not module_available("tensorrt"):  # not find_spec: this test folder itself is a "tensorrt" namespace
        return "tensorrt not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return ""


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "ok")]


@pytest.fixture(scope="module")
def gpu_model(pack):
    return build_model("tiny-sd15", dtype=torch.float16, device="cuda", seed=9)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from comfy_accel.accelerators.cache import ArtifactStore

    return ArtifactStore(tmp_path_factory.mktemp("trt-cache"))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_build_run_and_cache(pack, gpu_model, store):
    from comfy_accel.accelerators.tensorrt import apply

    eager = sample(gpu_model, steps=4)
    accelerated = apply(gpu_model, {"fallback": "error", "store": store, "preset": None})
    out = sample(accelerated, steps=4)
    assert rel(out, eager) < 3e-2   # fp16 engine vs eager
    entries = [e for e in store.entries() if e.accelerator == "tensorrt"]
    assert len(entries) == 1
    assert set(entries[0].files) == {"unet.plan", "refit_map.json", "profiles.json"}   # no ONNX kept
    fields = entries[0].key_fields
    assert fields["versions"]["tensorrt"] and fields["device"]["capability"]
    again = apply(gpu_model, {"fallback": "error", "store": store})   # served from the cache, no rebuild
    assert rel(sample(again, steps=4), out) < 1e-3
    assert len([e for e in store.entries() if e.accelerator == "tensorrt"]) == 1


def test_lora_is_refitted_and_removed(pack, gpu_model, store):
    import comfy.sd

    from comfy_accel.accelerators.tensorrt import apply
    from tests.lora import TARGETS, make_lora

    accelerated = apply(gpu_model, {"fallback": "error", "store": store})
    lora_sd = {k: v.half() for k, v in make_lora(gpu_model, TARGETS).items()}
    with_lora = comfy.sd.load_lora_for_models(accelerated, None, lora_sd, 1.0, 0.0)[0]
    expected = sample(comfy.sd.load_lora_for_models(gpu_model, None, lora_sd, 1.0, 0.0)[0], steps=4)
    plain = sample(gpu_model, steps=4)
    assert rel(expected, plain) > 1e-2
    assert rel(sample(with_lora, steps=4), expected) < 3e-2
    assert rel(sample(accelerated, steps=4), plain) < 3e-2
