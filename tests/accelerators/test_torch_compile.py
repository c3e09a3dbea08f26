"""The inductor backend on the real ComfyUI sampler (CPU): matches eager, LoRA loaded after the node is applied
without a recompile, one compile per shape bucket, shape policies and foreign wrappers fall back with a reason,
DeepCache's segments compiled once each, bad input refused with clear messages.
"""
import pytest
import torch

from tests.lora import TARGETS, make_lora, with_lora
from tools.model_factory import build_model, sample


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model(pack):
    return build_model("tiny-sd15", seed=21)  # its own model: LoRA patches its weights in place


@pytest.fixture(scope="module")
def twin(pack):
    """The same weights in another model: eager references that never touch the compiled model's tensors."""
    return build_model("tiny-sd15", seed=21)


@pytest.fixture()
def store(tmp_path):
    from comfy_accel.accelerators.cache import ArtifactStore

    return ArtifactStore(tmp_path / "cache")


def notices(node):
    from comfy_accel.accelerators import events

    return [n["message"] for n in events.recent(200) if n.get("node") == node]


@pytest.mark.slow
def test_inductor_matches_eager_applies_lora_without_recompile_and_compiles_once_per_bucket(pack, model, twin,
                                                                                           store):
    from comfy_accel.accelerators.compile.inductor import apply
    from comfy_accel.accelerators.compile.stand_in import session_of

    eager = sample(twin, steps=3)
    accelerated = apply(model, {"fallback": "error", "store": store, "node_id": "c1"})
    out = sample(accelerated, steps=3)
    session = session_of(accelerated)
    assert rel(out, eager) < 1e-4 and session.calls["compiled"] == 3 and session.calls["eager"] == 0
    compiled = len(session.compiler.compile_events)
    assert compiled >= 1
    assert any("compiled for batch 2, 64×64 px, 77 tokens" in n for n in notices("c1"))
    assert [e.accelerator for e in store.entries()] == ["inductor"]   # warm-restart artifacts kept

    # a LoRA loaded after the node: applied exactly as in eager, through the same compiled code
    lora = make_lora(twin, TARGETS)
    eager_lora = sample(with_lora(twin, lora), steps=3)
    accelerated_lora = sample(with_lora(accelerated, lora), steps=3)
    assert rel(eager_lora, eager) > 1e-3
    assert rel(accelerated_lora, eager_lora) < 1e-4
    assert len(session.compiler.compile_events) == compiled
    assert rel(sample(accelerated, steps=3), out) < 1e-5        # removed again: the base weights are back

    # a second resolution: one compile for its bucket, then reused
    eager_48 = sample(twin, steps=3, width=48, height=48)
    first = sample(accelerated, steps=3, width=48, height=48)
    after_first = len(session.compiler.compile_events)
    again = sample(accelerated, steps=3, width=48, height=48)
    assert after_first > compiled and len(session.compiler.compile_events) == after_first
    assert torch.equal(first, again) and rel(first, eager_48) < 1e-4
    assert sorted((b[0], b[1]) for b in session.buckets) == [(2, 6), (2, 8)]


@pytest.mark.slow
def test_shape_policies_foreign_wrappers_and_unavailable_backends_run_eager_with_a_reason(pack, model, twin):
    from comfy.patcher_extension import WrappersMP

    from comfy_accel.accelerators.base import BackendUnavailable
    from comfy_accel.accelerators.compile.session import MAX_BUCKETS, BucketState, CompileSession, parse_options
    from comfy_accel.accelerators.compile.inductor import InductorCompiler, apply, apply_cudagraphs

    # the shape policy, decided before anything compiles
    compiled_64 = (2, 8, 8, 77, 0, "float32", "cpu")
    batches = [(b, 8, 8, 77, 0, "float32", "cpu") for b in range(1, MAX_BUCKETS + 1)]   # MAX_BUCKETS compiled
    for options, known, other, reason in (
            ({"dynamic": "static"}, [compiled_64], (2, 6, 6, 77, 0, "float32", "cpu"),
             "differs from the compiled shape batch 2, 64×64 px, 77 tokens and the dynamic-shape policy is 'static'"),
            ({}, batches, (MAX_BUCKETS + 1, 8, 8, 77, 0, "float32", "cpu"),
             f"would be shape bucket {MAX_BUCKETS + 1}, over the limit of {MAX_BUCKETS}")):
        parsed = parse_options(options, "inductor")
        session = CompileSession(InductorCompiler(parsed), parsed)
        session.buckets.update((bucket, BucketState(compiled=True)) for bucket in known)
        assert reason in session.admit(other) and session.admit(known[-1]) == ""

    # another DIFFUSION_MODEL wrapper (a step cache we do not know): eager, exactly, with the reason
    wrapped = apply(model, {"node_id": "c2"})
    wrapped.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "someone.else", lambda executor, *a, **k: executor(*a, **k))
    assert torch.equal(sample(wrapped, steps=2), sample(twin, steps=2))
    assert any("wrapped by someone.else" in n and n.endswith("running eager") for n in notices("c2"))

    # CUDA graphs asked for on a machine without a GPU
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
            apply_cudagraphs(model, {"fallback": "error"})
        plain = apply_cudagraphs(model, {"fallback": "eager", "node_id": "c3"})
        assert torch.equal(sample(plain, steps=2), sample(twin, steps=2))
        assert any("needs a CUDA GPU" in n for n in notices("c3"))


def test_bad_input_gets_clear_messages(pack, model):
    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.compile.inductor import apply

    flux = build_model("tiny-flux")
    with pytest.raises(AcceleratorInputError, match="SD1.x/SD2.x/SDXL UNet"):
        apply(flux, {})
    with pytest.raises(AcceleratorInputError, match="unknown mode 'turbo'; choose one of: default, max-autotune"):
        apply(model, {"mode": "turbo"})
    with pytest.raises(AcceleratorInputError, match="unknown dynamic shapes 'maybe'; choose one of: buckets, static, dynamic"):
        apply(model, {"dynamic": "maybe"})
    with pytest.raises(AcceleratorInputError, match="unknown backend 'warp'; choose one of: auto, default"):
        accelerate(model, backend="warp")
    with pytest.raises(AcceleratorInputError, match="unknown fallback policy 'sometimes'"):
        accelerate(model, backend="inductor", fallback="sometimes")


def test_keep_weights_on_gpu_sets_the_offload_device_that_lora_clones_inherit(pack, twin):
    """The node's keep_weights_on_gpu option: the accelerated clone (and a LoRA loaded after it) unload to the
    device they run on, as ComfyUI's --highvram does for every model; the input model is untouched. On this CPU
    box both devices are the CPU, so the model gets an offload device object of its own to tell them apart."""
    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.base import AcceleratorInputError

    base = build_model("tiny-sd15", seed=21)
    source = base.clone()
    source.offload_device = torch.device("cpu", 0)   # != torch.device("cpu"), which is the load device here
    assert source.offload_device != source.load_device
    kept, in_effect = accelerate(source, backend="eager", keep_weights_on_gpu=True, node_id="k1")
    assert kept.offload_device == kept.load_device and source.offload_device == torch.device("cpu", 0)
    assert "weights stay on cpu between runs and LoRA changes (instead of moving to cpu:0)" in \
        in_effect["keep_weights_on_gpu"]
    assert any("weights stay on cpu" in n for n in notices("k1"))
    lora = make_lora(kept, list(TARGETS), seed=3)
    patched = with_lora(kept, lora)
    assert patched.offload_device == patched.load_device and patched.weight_inplace_update
    addresses = {name: p.data_ptr() for name, p in patched.model.diffusion_model.named_parameters()}
    assert rel(sample(patched, steps=2), sample(with_lora(twin, lora), steps=2)) < 1e-5
    # the LoRA went into the same tensors (what keeps CUDA graphs valid without a re-capture)
    assert {name: p.data_ptr() for name, p in patched.model.diffusion_model.named_parameters()} == addresses

    _, plain = accelerate(base, backend="eager")
    assert "keep_weights_on_gpu" not in plain
    _, same = accelerate(base, backend="eager", keep_weights_on_gpu=True)
    assert same["keep_weights_on_gpu"].startswith("weights already stay on cpu")
    assert "LoRAs are patched into them in place" in same["keep_weights_on_gpu"]
    with pytest.raises(AcceleratorInputError, match="keep_weights_on_gpu must be true or false; got 'yes'"):
        accelerate(base, backend="eager", keep_weights_on_gpu="yes")


@pytest.mark.slow
def test_deepcache_segments_compile_once_each(pack, model, twin):
    from comfy_accel.accelerators.compile.stand_in import session_of
    from comfy_accel.accelerators.deepcache import DeepCacheConfig
    from comfy_accel.accelerators.deepcache import apply as deepcache
    from comfy_accel.accelerators.compile.inductor import apply

    reference = sample(deepcache(twin, DeepCacheConfig(cache_interval=3)), steps=6)
    accelerated = apply(deepcache(model, DeepCacheConfig(cache_interval=3)), {"fallback": "error"})
    out = sample(accelerated, steps=6)
    session = session_of(accelerated)
    compiled = [e["what"] for e in session.compiler.compile_events]
    assert sorted(set(compiled)) == ["deepcache.b0.deep", "deepcache.b0.shallow_in", "deepcache.b0.shallow_out"]
    again = sample(accelerated, steps=6)
    assert len(session.compiler.compile_events) == len(compiled)   # no recompile per step or per run
    assert rel(out, reference) < 1e-4 and torch.equal(out, again)


@pytest.mark.slow
def test_warm_restart_a_fresh_process_compiles_no_kernel(pack, tmp_path):
    """Process 1 compiles and stores torch's compile artifacts in the shared cache; process 2, with an empty
    inductor cache of its own, loads them from the store and generates no kernel (the FX-graph cache hits)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("compile_worker.py")
    store = tmp_path / "store"
    results = []
    for run in (1, 2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}")}
        done = subprocess.run([sys.executable, str(worker), str(store), str(tmp_path / f"latent-{run}.pt")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    cold, warm = results
    assert cold["fxgraph_cache_miss"] >= 1 and not any("warm start" in n for n in cold["notices"])
    assert warm["fxgraph_cache_miss"] == 0 and warm["fxgraph_cache_hit"] >= 1, warm
    assert any("warm start: compiled artifacts for batch 2, 64×64 px, 77 tokens loaded" in n for n in warm["notices"])
    assert torch.equal(torch.load(tmp_path / "latent-1.pt"), torch.load(tmp_path / "latent-2.pt"))
    print(f"first sample: cold {cold['first_sample_s']:.1f} s, warm {warm['first_sample_s']:.1f} s")


@pytest.mark.slow
def test_freeu_added_after_the_node_runs_inside_the_compiled_unet(pack, model, twin):
    """ComfyUI's own FreeU_V2 patch (transformer_options) on the accelerated model: compiled with the UNet, same
    result as FreeU in eager."""
    from comfy_extras.nodes_freelunch import FreeU_V2

    from comfy_accel.accelerators.compile.inductor import apply
    from comfy_accel.accelerators.compile.stand_in import session_of

    plain = sample(twin, steps=3)
    reference = sample(FreeU_V2().patch(twin, 1.3, 1.4, 0.9, 0.2)[0], steps=3)
    accelerated = FreeU_V2().patch(apply(model, {"fallback": "error"}), 1.3, 1.4, 0.9, 0.2)[0]
    out = sample(accelerated, steps=3)
    session = session_of(accelerated)
    assert session.calls["compiled"] == 3 and session.calls["eager"] == 0
    assert rel(reference, plain) > 1e-3           # FreeU is a real change here
    assert rel(out, reference) < 1e-4


@pytest.mark.slow
def test_fp8_weights_from_comfyuis_unet_loader_compile_and_match_their_eager_run(pack, tmp_path):
    """A UNet loaded by ComfyUI's own UNETLoader with weight_dtype fp8_e4m3fn_fast (the user's way to fp8; on this
    CPU its layers upcast the fp8 weights, on Hopper they multiply in fp8): compiled without a fallback, equal
    to the same fp8 model run eager."""
    from comfy_accel.accelerators.compile.inductor import apply
    from comfy_accel.accelerators.compile.stand_in import session_of
    from tools.model_factory import load_unet_as

    base = build_model("small-sd15", seed=23)   # the smallest model ComfyUI's loader recognises as SD1.5
    fp8 = load_unet_as(base, "fp8_e4m3fn_fast", tmp_path)
    assert fp8.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float8_e4m3fn
    reference = sample(fp8, steps=3)
    accelerated = apply(fp8, {"fallback": "error"})
    out = sample(accelerated, steps=3)
    session = session_of(accelerated)
    assert session.calls["compiled"] == 3 and session.calls["eager"] == 0
    assert rel(reference, sample(base, steps=3)) > 1e-2   # fp8 is a real change of the weights ...
    assert rel(out, reference) < 1e-4                      # ... which the compiled UNet reproduces
    # a LoRA loaded after the node: ComfyUI rounds the patched weights back to fp8 (stochastic, seeded per key)
    lora = make_lora(fp8, list(TARGETS), seed=4)
    eager_lora = sample(with_lora(fp8, lora), steps=3)
    assert rel(eager_lora, reference) > 1e-3
    assert rel(sample(with_lora(accelerated, lora), steps=3), eager_lora) < 1e-4


@pytest.mark.slow
def test_channels_last_weights_keep_values_lora_and_survive_a_replaced_parameter(pack, twin, store):
    """What the GPU lanes do by default (convolution weights stored channels-last), forced on here on the CPU:
    the same latent as eager, the same Parameter objects, a LoRA loaded after the node applied without a
    recompile, and a weight ComfyUI replaces with a contiguous tensor converted again before the next run."""
    import comfy.utils

    from comfy_accel.accelerators.compile.graphs import channels_last_weights
    from comfy_accel.accelerators.compile.inductor import apply
    from comfy_accel.accelerators.compile.stand_in import session_of

    model = build_model("tiny-sd15", seed=21)   # the twin's weights; its own tensors change layout
    unet = model.model.diffusion_model
    conv_weights = {name: p for name, p in unet.named_parameters() if p.dim() == 4}
    accelerated = apply(model, {"fallback": "error", "store": store, "node_id": "cl"})
    session = session_of(accelerated)
    session.compiler.channels_last = True
    eager = sample(twin, steps=3)
    out = sample(accelerated, steps=3)
    assert rel(out, eager) < 1e-4
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights.values())
    assert all(p is dict(unet.named_parameters())[name] for name, p in conv_weights.items())
    assert any("convolution weights stored channels-last" in n for n in notices("cl")), notices("cl")
    assert channels_last_weights(unet) == 0   # already done: nothing to change

    compiled = len(session.compiler.compile_events)
    lora = make_lora(twin, TARGETS)
    assert rel(sample(with_lora(accelerated, lora), steps=3), sample(with_lora(twin, lora), steps=3)) < 1e-4
    assert len(session.compiler.compile_events) == compiled

    name = "input_blocks.0.0.weight"
    comfy.utils.set_attr_param(unet, name, conv_weights[name].detach().contiguous().clone())
    assert not dict(unet.named_parameters())[name].is_contiguous(memory_format=torch.channels_last)
    assert rel(sample(accelerated, steps=3), eager) < 1e-4
    assert dict(unet.named_parameters())[name].is_contiguous(memory_format=torch.channels_last)
