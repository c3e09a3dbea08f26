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
    flags = sfast_flags("default")
    assert flags["enable_jit_freeze"] is False          # freezing bakes the weights: LoRA would not apply
    assert flags["enable_cuda_graph"] is False          # our own graphs sit in front
    assert flags["prefer_lowp_gemm"] is False and flags["enable_fused_linear_geglu"] is False   # fp32 accumulation
    fast = sfast_flags("max-autotune")
    assert fast["prefer_lowp_gemm"] is True and fast["enable_jit_freeze"] is False


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


@pytest.mark.parametrize("name", ["onediff", "stable-fast"])
def test_models_it_cannot_trace_are_refused_with_the_reason(pack, name):
    """Both trace or compile the SD UNet only: a DiT is refused up front, naming its family (never a silent
    no-op), whether or not the library is installed: eager with that line under the `eager` policy, an error
    under `error`."""
    from comfy_accel.accelerators import events, registry
    from comfy_accel.accelerators.base import AcceleratorInputError
    from tools.model_factory import build_model

    flux = build_model("tiny-flux")
    with pytest.raises(AcceleratorInputError, match="SD1.x/SD2.x/SDXL UNet models only; this MODEL is Flux"):
        registry.get(name).apply(flux, {"fallback": "error"})
    with events.collect() as lines:
        out = registry.get(name).apply(flux, {"fallback": "eager", "node_id": f"refuse-{name}"})
    assert out is not flux and out.model is flux.model    # a clone that runs the model as it is
    assert any(line["node"] == f"refuse-{name}" and "this MODEL is Flux" in line["message"]
               and line["message"].endswith("running eager") for line in lines)


def test_stable_fast_trace_reads_the_live_weights(pack):
    """Where stable-fast imports (a CPU build here: WITH_CUDA=0 tools/build_stable_fast.sh), the adapter's trace of
    the tiny UNet matches eager and reads the weights as module attributes, not constants: a weight changed in
    place (how ComfyUI patches a LoRA under the backend) changes the traced output without a re-trace."""
    from comfy_accel.accelerators.compile import stable_fast
    from comfy_accel.accelerators.compile.session import parse_options
    from tools.model_factory import build_model, unet_inputs

    if not stable_fast.library_found():
        pytest.skip(stable_fast.available().reason)
    if stable_fast._extension_error():
        pytest.skip(f"stable-fast's C++ extension does not load: {stable_fast._extension_error()}")
    model = build_model("tiny-sd15", seed=3)
    if torch.cuda.is_available():   # its passes pick cuDNN operators there: the weights must be where they run
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    compiler = stable_fast.StableFastCompiler(parse_options({}, "stable-fast", cuda_graphs=True))
    run = compiler.compile_module(unet)
    x, t, context, _ = unet_inputs(model)   # on the model's load device
    tolerance = 1e-4 if x.device.type == "cpu" else 1e-2   # on a GPU: TF32 convolutions, fused or not
    with torch.inference_mode():
        eager = unet(x, t, context=context, transformer_options={})
        traced = run(x, t, context=context, transformer_options={})
        assert ((traced - eager).norm() / eager.norm()).item() < tolerance
        assert len(compiler.traces) == 1 and stable_fast.reads_live_parameters(compiler.traces[0])
        weight = unet.input_blocks[1][1].proj_in.weight
        with torch.no_grad():
            weight.mul_(1.5)
        changed = unet(x, t, context=context, transformer_options={})
        assert ((changed - eager).norm() / eager.norm()).item() > 1e-3
        again = run(x, t, context=context, transformer_options={})
        assert ((again - changed).norm() / changed.norm()).item() < tolerance
    assert [e["what"] for e in compiler.compile_events] == ["trace"]
