"""The tensorrt backend inside the real ComfyUI sampler, on a machine without TensorRT.

- Without TensorRT, the backend runs eager and says why (or refuses under the `error` policy); bad models and
  options get clear messages.
- The loader's logic — the APPLY_MODEL swap, profile choice and misses, LoRA refit and restore, ControlNet /
  FreeU / DeepCache fallbacks, memory reporting to ComfyUI — is driven end to end by the real sampler with
  the engine runtime replaced by `OnnxRuntimeEngine`: the exported ONNX run by onnxruntime, refitted by
  rewriting its initializers (the same names and values the TensorRT refitter gets). It is a test double for
  the TensorRT runtime only; tests/accelerators/tensorrt/test_tensorrt_gpu.py runs the real one.
"""
import pytest
import torch

from tools.model_factory import build_model, sample

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")


# ---- no TensorRT here: eager with a reason ------------------------------------------------------------------
def test_without_tensorrt_runs_eager_and_says_why(pack, tiny_sd15):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.tensorrt import apply, available

    if available():
        pytest.skip("TensorRT is available here: the fallback path is not what runs")
    plain = sample(tiny_sd15, steps=3)
    accelerated = apply(tiny_sd15, {"fallback": "eager", "node_id": "7", "store": None, "mode": "default",
                                    "dynamic": "buckets"})
    assert accelerated is not tiny_sd15
    assert torch.equal(sample(accelerated, steps=3), plain)
    notes = [n for n in events.recent() if n["accelerator"] == "tensorrt" and n["node"] == "7"]
    assert notes and "not installed" in notes[-1]["message"] and notes[-1]["message"].endswith("running eager")


def test_error_policy_refuses_without_tensorrt(pack, tiny_sd15):
    from comfy_accel.accelerators.base import BackendUnavailable
    from comfy_accel.accelerators.tensorrt import apply, available

    if available():
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendUnavailable, match=r"^tensorrt: (tensorrt not installed|needs a CUDA GPU)"):
        apply(tiny_sd15, {"fallback": "error", "store": None})


def test_a_model_that_is_not_a_unet_is_refused(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.tensorrt import apply

    flux = build_model("tiny-flux")
    with pytest.raises(AcceleratorInputError, match="TensorRT works on SD1.x/SD2.x/SDXL UNet models; this MODEL is Flux"):
        apply(flux, {})
    with pytest.raises(AcceleratorInputError, match="TensorRT needs a MODEL .* got str"):
        apply("a vae", {})


@pytest.mark.parametrize("options, message", [
    ({"fallback": "maybe"}, "unknown fallback policy 'maybe'; choose one of: eager, error"),
    ({"dynamic": "sometimes"}, "unknown dynamic shapes 'sometimes'; choose one of: buckets, static, dynamic"),
    ({"preset": "huge"}, "unknown TensorRT profile preset 'huge'"),
    ({"profiles": [{"batch": [4, 2, 1], "height": 512, "width": 512, "tokens": 77}]}, "batch needs min <= opt <= max"),
    ({"optimization_level": 9}, "optimization_level must be a whole number 0..5; got 9"),
    ({"build_on_demand": "yes"}, "build_on_demand must be true or false"),
])
def test_bad_options_are_named(pack, tiny_sd15, options, message):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.tensorrt import apply

    with pytest.raises(AcceleratorInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply(tiny_sd15, options)


def test_calls_a_baked_engine_cannot_honour(pack, tiny_sd15):
    from comfy_extras.nodes_freelunch import FreeU

    from comfy_accel.accelerators.tensorrt.loader import unsupported_call_reason

    assert unsupported_call_reason(None, {"patches": {}, "wrappers": {"diffusion_model": {}}}, {"y": None}) == ""
    assert "ControlNet" in unsupported_call_reason(object(), {}, {})
    freeu = FreeU().patch(tiny_sd15, 1.1, 1.2, 0.9, 0.2)[0]
    reason = unsupported_call_reason(None, freeu.model_options["transformer_options"], {})
    assert "output_block_patch" in reason and "nodes_freelunch" in reason
    wrapped = {"wrappers": {"diffusion_model": {"comfy_accel.deepcache": [lambda *a: None]}}}
    assert "comfy_accel.deepcache" in unsupported_call_reason(None, wrapped, {})
    assert "num_video_frames" in unsupported_call_reason(None, {}, {"num_video_frames": 14})


# ---- the loader end to end, with onnxruntime standing in for the TensorRT runtime -------------------------
class OnnxRuntimeEngine:
    """The engine interface of engine.TensorRTEngine, run by onnxruntime on the exported ONNX."""

    def __init__(self, onnx_bytes, profiles, device=None):
        import onnx

        self.graph = onnx.load_from_string(onnx_bytes)
        self.profiles = list(profiles)
        self.input_names = tuple(i.name for i in self.graph.graph.input)
        self.nbytes = len(onnx_bytes)
        self.device = torch.device("cpu")
        self.refittable = True
        self.refits = []
        self.released = False
        self._session()

    def _session(self):
        self.session = ort.InferenceSession(self.graph.SerializeToString(), providers=["CPUExecutionProvider"])

    def input_dtype(self, name):
        return torch.float32

    def run(self, profile_index, inputs):
        profile = self.profiles[profile_index]
        x = inputs["x"]
        assert profile.batch.covers(x.shape[0]) and profile.height.covers(x.shape[2] * 8)
        feed = {n: inputs[n].detach().float().cpu().numpy() for n in self.input_names}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def refit(self, values, complete):
        from comfy_accel.accelerators.tensorrt.export import write_engine_weights

        self.refits.append(set(values))
        write_engine_weights(self.graph, values)
        self._session()
        return len(values)

    def release(self):
        self.released = True
        self.session = None


@pytest.fixture(scope="module")
def engine_model(pack):
    return build_model("tiny-sd15", seed=5)   # its own model: LoRAs are merged into it in place


@pytest.fixture(scope="module")
def engine_record(engine_model, tmp_path_factory):
    """An 'engine' for 64×64 px, batch 1 and batch 2, 77 tokens (a preset-like pair of profiles)."""
    from comfy_accel.accelerators.tensorrt.export import export_onnx
    from comfy_accel.accelerators.tensorrt.loader import EngineRecord
    from comfy_accel.accelerators.tensorrt.profiles import make_profile

    profiles = [make_profile(1, 64, 64, 77), make_profile((2, 2, 4), 64, 64, (77, 77, 154))]
    exported = export_onnx(engine_model.model.diffusion_model, tmp_path_factory.mktemp("engine"), profiles[1])
    plan = exported.path.read_bytes()
    return lambda: EngineRecord(source="test-engine", profiles=profiles, refit_map=exported.refit_map,
                                load_plan=lambda: plan)


def accelerate(model, record, fallback="eager", node_id="trt"):
    from comfy_accel.accelerators.base import Availability
    from comfy_accel.accelerators.tensorrt.loader import TensorRTOptions, TensorRTSession, attach

    session = TensorRTSession(TensorRTOptions(fallback=fallback, node_id=node_id, build_on_demand=False),
                              engines=[record], engine_loader=OnnxRuntimeEngine,
                              check_available=lambda: Availability(True, "onnxruntime stand-in"))
    return attach(model, session), session


def notices(node_id):
    from comfy_accel.accelerators import events

    return [n["message"] for n in events.recent(200) if n["node"] == node_id]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def lora_for(model, strength):
    import comfy.sd

    from tests.lora import TARGETS, make_lora

    return comfy.sd.load_lora_for_models(model, None, make_lora(model, TARGETS), strength, 0.0)[0]


def test_engine_serves_cfg_and_cutoff_batches_through_the_real_sampler(pack, engine_model, engine_record):
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig
    from comfy_accel.accelerators.cfg_cutoff import apply as cfg_cutoff

    record = engine_record()
    model, session = accelerate(cfg_cutoff(engine_model, CFGCutoffConfig(cutoff_percent=50)), record, node_id="n1")
    reference = sample(cfg_cutoff(engine_model, CFGCutoffConfig(cutoff_percent=50)), steps=4)
    calls = []
    out = sample(model, steps=4)
    assert rel(out, reference) < 1e-4
    assert record.engine is not None and not notices("n1")   # no fallback happened
    engine = record.engine
    engine_run = engine.run
    engine.run = lambda index, inputs: calls.append((index, inputs["x"].shape[0])) or engine_run(index, inputs)
    sample(model, steps=4)
    assert calls == [(1, 2), (1, 2), (0, 1), (0, 1)]   # batch-2 profile with CFG, batch-1 after the cutoff


def test_request_outside_every_profile_runs_eager_with_the_reason(pack, engine_model, engine_record):
    from comfy_accel.accelerators.base import BackendUnavailable

    model, _ = accelerate(engine_model, engine_record(), node_id="n2")
    out = sample(model, steps=2, width=96, height=64)
    assert torch.equal(out, sample(engine_model, steps=2, width=96, height=64))
    assert any("no engine profile covers batch 2, 96×64 px, 77 tokens" in m and "width 96 outside 64" in m
               and m.endswith("running eager") for m in notices("n2"))
    strict, _ = accelerate(engine_model, engine_record(), fallback="error", node_id="n3")
    with pytest.raises(BackendUnavailable, match="tensorrt: no engine profile covers batch 2, 96×64 px"):
        sample(strict, steps=2, width=96, height=64)


def test_lora_after_the_node_is_refitted_and_removed_again(pack, engine_model, engine_record):
    import comfy.model_management

    from tests.lora import BIAS_DIFF, TARGETS

    record = engine_record()
    accelerated, _ = accelerate(engine_model, record, node_id="n4")
    plain = sample(engine_model, steps=3)
    assert rel(sample(accelerated, steps=3), plain) < 1e-4
    with_lora = lora_for(accelerated, 0.9)
    expected = sample(lora_for(engine_model, 0.9), steps=3)
    assert rel(expected, plain) > 1e-3
    assert rel(sample(with_lora, steps=3), expected) < 1e-4
    assert record.engine.refits == [set(TARGETS.values()) | {BIAS_DIFF[1]}]   # only the LoRA's weights
    sample(with_lora, steps=3)
    assert len(record.engine.refits) == 1                                     # same LoRA: no second refit
    assert rel(sample(accelerated, steps=3), plain) < 1e-4                    # LoRA removed: base restored
    assert record.engine.refits[-1] == set(TARGETS.values()) | {BIAS_DIFF[1]}
    assert any(f"refitted {len(TARGETS) + 1} weights" in m for m in notices("n4"))   # + the bias
    comfy.model_management.unload_all_models()


def test_freeu_and_controlnet_style_patches_fall_back_with_a_reason(pack, engine_model, engine_record):
    from comfy_extras.nodes_freelunch import FreeU

    accelerated, _ = accelerate(engine_model, engine_record(), node_id="n5")
    freeu = FreeU().patch(accelerated, 1.1, 1.2, 0.9, 0.2)[0]
    expected = sample(FreeU().patch(engine_model, 1.1, 1.2, 0.9, 0.2)[0], steps=2)
    assert torch.equal(sample(freeu, steps=2), expected)   # FreeU honoured: eager, same result
    assert any("output_block_patch" in m and m.endswith("running eager") for m in notices("n5"))


def test_engine_memory_is_reported_to_comfy_and_released_on_unload(pack, engine_model, engine_record):
    import comfy.model_management as mm

    from comfy_accel.accelerators.tensorrt.loader import RESIDENCY_KEY

    record = engine_record()
    accelerated, session = accelerate(engine_model, record, node_id="n6")
    sample(accelerated, steps=1)
    engine = record.engine
    assert engine is not None and session.residency.nbytes == engine.nbytes > 0
    mm.load_models_gpu([accelerated])   # what prepare_sampling does: the engine's holder is loaded with the UNet
    holders = accelerated.get_additional_models_with_key(RESIDENCY_KEY)
    loaded = [lm for lm in mm.current_loaded_models if lm.model in holders]
    assert loaded and loaded[0].model_memory() == engine.nbytes and loaded[0].model_loaded_memory() == engine.nbytes
    mm.unload_all_models()
    assert engine.released and record.engine is None and session.residency.nbytes == 0
    assert rel(sample(accelerated, steps=1), sample(engine_model, steps=1)) < 1e-4   # reloaded on next use
    assert record.engine is not None
    mm.unload_all_models()
