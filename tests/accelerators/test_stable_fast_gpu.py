"""The stable-fast backend on a CUDA GPU where stable-fast loads (tools/build_stable_fast.sh builds it for torch
≥ 2.10): traced UNet replayed as CUDA graphs matches eager, a LoRA loaded after the node applies without a
re-trace (the trace reads the live parameters), replaced parameter objects are traced again, and what it cannot
trace runs eager with the reason. Skipped with the reason where no GPU or no stable-fast is present."""
import pytest
import torch

from tools.model_factory import build_model, random_lora, sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")]


# stable-fast's cuDNN convolution fusions move the latent about three times as far from eager as inductor's fp16
# noise (docs/benchmarks.md: tiny models 8.5e-3 / 9.5e-3 at 4 steps on an H200), still far below what a CFG step of
# 0.5 moves (≈4.5e-2)
TOLERANCE = 2e-2


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def stable_fast(pack):
    from comfy_accel.accelerators.compile import stable_fast

    ready = stable_fast.available()
    if not ready:
        pytest.skip(f"stable-fast: {ready.reason}")
    return stable_fast


def pair(family, seed=5):
    """The model the backend gets and a twin with the same weights for eager references."""
    return tuple(build_model(family, dtype=torch.float16, device="cuda", seed=seed) for _ in range(2))


def trace_events(session):
    return [e["what"] for e in session.compiler.compile_events]


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl"])
def test_matches_eager_as_graphs_and_a_lora_after_the_node_applies(stable_fast, family):
    from comfy_accel.accelerators.compile.stand_in import session_of
    from tests.lora import with_lora

    model, twin = pair(family)
    eager = sample(twin, steps=4)
    accelerated = stable_fast.apply(model, {"fallback": "error", "node_id": f"sf-{family}"})
    out = sample(accelerated, steps=4)
    session = session_of(accelerated)
    assert session.calls["graph"] == 4 and session.calls["eager"] == 0
    print(f"{family}: stable-fast vs eager {rel(out, eager):.2e}, traces {trace_events(session)}")
    assert rel(out, eager) < TOLERANCE
    assert session.compiler.traces and all(stable_fast.reads_live_parameters(t) for t in session.compiler.traces)
    traced = trace_events(session)

    lora = {k: v.half() for k, v in random_lora(model, layers=8).items()}
    eager_lora = sample(with_lora(twin, lora), steps=4)
    out_lora = sample(with_lora(accelerated, lora), steps=4)
    print(f"{family}: LoRA changes eager by {rel(eager_lora, eager):.2e}; stable-fast vs eager with it "
          f"{rel(out_lora, eager_lora):.2e}")
    assert rel(eager_lora, eager) > 10 * TOLERANCE       # the LoRA is a real change
    assert rel(out_lora, eager_lora) < TOLERANCE         # ... applied through the trace, not baked out
    assert trace_events(session) == traced               # no re-trace: only the graphs were re-captured
    assert rel(sample(accelerated, steps=4), out) < 1e-3   # removed again: the base result


def test_replaced_parameter_objects_are_traced_again(stable_fast):
    """A trace holds the Parameter objects it was made with: where a host replaces one (ComfyUI without
    weight_inplace_update, comfy.utils.set_attr_param) the backend notices and traces again."""
    import comfy.utils

    from comfy_accel.accelerators.compile.stand_in import session_of

    model, twin = pair("tiny-sd15", seed=6)
    accelerated = stable_fast.apply(model, {"fallback": "error"})
    sample(accelerated, steps=3)
    before = sample(twin, steps=3)
    session = session_of(accelerated)
    key = "input_blocks.1.1.proj_in.weight"
    for patcher in (model, twin):
        unet = patcher.model.diffusion_model
        comfy.utils.set_attr_param(unet, key, comfy.utils.get_attr(unet, key).detach() * 1.5)
    out = sample(accelerated, steps=3)
    after = sample(twin, steps=3)
    assert rel(after, before) > 10 * TOLERANCE           # a real change (≈0.4 on the CPU)
    assert "re-trace (parameters replaced)" in trace_events(session)
    assert rel(out, after) < TOLERANCE


def test_what_it_cannot_trace_runs_eager_with_the_reason(stable_fast):
    """A patch of unknown per-step state and DeepCache's segments: a trace would freeze their Python."""
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.compile.stand_in import session_of
    from comfy_accel.accelerators.deepcache import DeepCacheConfig
    from comfy_accel.accelerators.deepcache import apply as deepcache

    model, twin = pair("tiny-sd15", seed=7)

    def keep_qkv(q, k, v, extra_options):
        return q, k, v

    with_patch = []
    for patcher in (model, twin):
        clone = patcher.clone()
        clone.set_model_attn1_patch(keep_qkv)
        with_patch.append(clone)
    accelerated = stable_fast.apply(with_patch[0], {"fallback": "eager", "node_id": "sf-patch"})
    assert rel(sample(accelerated, steps=2), sample(with_patch[1], steps=2)) < 1e-4
    session = session_of(accelerated)
    assert session.calls["eager"] >= 2 and session.calls["graph"] == 0
    notes = [n["message"] for n in events.recent(200) if n.get("node") == "sf-patch"]
    assert any("attn1_patch patch" in n and n.endswith("running eager") for n in notes), notes

    cached = stable_fast.apply(deepcache(model, DeepCacheConfig(cache_interval=3)),
                               {"fallback": "eager", "node_id": "sf-deepcache"})
    reference = sample(deepcache(twin, DeepCacheConfig(cache_interval=3)), steps=4)
    assert rel(sample(cached, steps=4), reference) < 1e-4
    notes = [n["message"] for n in events.recent(200) if n.get("node") == "sf-deepcache"]
    assert any("not DeepCache's segment" in n and n.endswith("running eager") for n in notes), notes
