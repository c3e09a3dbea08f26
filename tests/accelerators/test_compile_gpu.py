"""inductor+cudagraphs on a CUDA GPU: graphs per shape bucket, LoRA without recompile or re-capture,
weights that move get re-captured, ComfyUI unloading frees the graphs, DeepCache segments captured once.

Runs only where a CUDA GPU is present; elsewhere every test is skipped with that reason.
"""
import pytest
import torch

from tests.lora import TARGETS, make_lora, with_lora
from tools.model_factory import build_model, sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def gpu_model(pack):
    return build_model("tiny-sd15", dtype=torch.float16, device="cuda", seed=5)


@pytest.fixture(scope="module")
def twin(pack):
    """The same weights in a second model: eager references that never touch the accelerated model's tensors."""
    return build_model("tiny-sd15", dtype=torch.float16, device="cuda", seed=5)


@pytest.fixture()
def store(tmp_path):
    from comfy_accel.accelerators.cache import ArtifactStore

    return ArtifactStore(tmp_path / "cache")


def graphs(session):
    return set(session.graphs.keys)


def test_graphs_match_eager_and_lora_needs_no_recompile(pack, gpu_model, twin, store):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.compiled_unet import session_of
    from comfy_accel.accelerators.torch_compile import apply_cudagraphs

    eager = sample(twin, steps=4)
    accelerated = apply_cudagraphs(gpu_model, {"fallback": "error", "store": store})
    out = sample(accelerated, steps=4)
    session = session_of(accelerated)
    assert session.calls["graph"] == 4 and session.calls["eager"] == 0
    assert rel(out, eager) < 1e-2
    captured, compiles = graphs(session), len(session.compiler.compile_events)

    lora = {k: v.half() for k, v in make_lora(gpu_model, TARGETS).items()}
    eager_lora = sample(with_lora(twin, lora), steps=4)
    accelerated_lora = sample(with_lora(accelerated, lora), steps=4)
    assert rel(eager_lora, eager) > 1e-2                     # the LoRA is a real change
    assert rel(accelerated_lora, eager_lora) < 1e-2          # ... and the graphs apply it
    # ComfyUI moves the weights through the offload device when the LoRA changes: the graph is re-captured
    # (milliseconds), never recompiled
    assert graphs(session) == captured and len(session.compiler.compile_events) == compiles
    notes = [n["message"] for n in events.recent() if n["accelerator"] == "inductor+cudagraphs"]
    assert not any("recompiled" in n for n in notes), notes
    assert rel(sample(accelerated, steps=4), out) < 1e-3     # removed again: back to the base result


def test_cfg_cutoff_captures_batch_1_and_2_once(pack, gpu_model, twin, store):
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig
    from comfy_accel.accelerators.cfg_cutoff import apply as cutoff
    from comfy_accel.accelerators.compiled_unet import session_of
    from comfy_accel.accelerators.torch_compile import apply_cudagraphs

    eager = sample(cutoff(twin, CFGCutoffConfig(cutoff_percent=50.0)), steps=6)
    base = cutoff(gpu_model, CFGCutoffConfig(cutoff_percent=50.0))
    accelerated = apply_cudagraphs(base, {"fallback": "error", "store": store})
    out = sample(accelerated, steps=6)
    session = session_of(accelerated)
    assert sorted(key[0][0] for key in graphs(session)) == [1, 2]
    again = sample(accelerated, steps=6)
    assert len(graphs(session)) == 2 and torch.equal(out, again)
    assert rel(out, eager) < 1e-2


def test_moved_weights_are_recaptured_and_unload_frees_graphs(pack, gpu_model, store):
    import comfy.model_management

    from comfy_accel.accelerators.compiled_unet import session_of
    from comfy_accel.accelerators.torch_compile import apply_cudagraphs

    accelerated = apply_cudagraphs(gpu_model, {"fallback": "error", "store": store})
    out = sample(accelerated, steps=3)
    session = session_of(accelerated)
    assert graphs(session)
    loaded = [(x.model is accelerated, x.device) for x in comfy.model_management.current_loaded_models]
    print("loaded before unload:", loaded, "callbacks:", accelerated.get_all_callbacks("on_detach_after"))
    comfy.model_management.unload_all_models()   # ComfyUI offloads: weights leave the GPU, graphs are freed
    assert not graphs(session)
    again = sample(accelerated, steps=3)         # reloaded to new addresses: captured again, same result
    assert graphs(session) and rel(again, out) < 1e-3


def test_deepcache_segments_are_captured_once(pack, gpu_model, twin, store):
    from comfy_accel.accelerators.compiled_unet import session_of
    from comfy_accel.accelerators.deepcache import DeepCacheConfig
    from comfy_accel.accelerators.deepcache import apply as deepcache
    from comfy_accel.accelerators.torch_compile import apply_cudagraphs

    eager = sample(deepcache(twin, DeepCacheConfig(cache_interval=3)), steps=6)
    base = deepcache(gpu_model, DeepCacheConfig(cache_interval=3))
    accelerated = apply_cudagraphs(base, {"fallback": "error", "store": store})
    out = sample(accelerated, steps=6)
    session = session_of(accelerated)
    names = sorted(key[0][0] for key in graphs(session))
    assert names == ["deepcache.b0.deep", "deepcache.b0.shallow_in", "deepcache.b0.shallow_out"]
    sample(accelerated, steps=6)
    assert len(graphs(session)) == 3
    assert rel(out, eager) < 1e-2
