"""precision fp8 (accelerators/compile/fp8.py) on the CPU: the row-wise quantization against float32, the KEEP
lists, the routing inside the compiled lane (dynamo with aot_eager; this torch's CPU `_scaled_mm` takes row-wise
scales, so the real op runs) on a tiny Flux (block by block, CUDA-graph path) and a tiny SD1.5 UNet (whole), a
LoRA after the node re-quantized with no recompile, and the fallback where fp8 cannot run (this CPU)."""
import pytest
import torch

from tests.accelerators.test_compile_dit import aot_eager_compiler, captures, rel, static_replay_class
from tests.lora import with_lora
from tools.dit_factory import build_dit, random_dit_lora, sample_dit


@pytest.fixture(scope="module")
def fp8(pack):
    from comfy_accel.accelerators.compile import fp8

    return fp8


def notices(node):
    from comfy_accel.accelerators import events

    return [(n["accelerator"], n["level"], n["message"]) for n in events.recent(300) if n.get("node") == node]


# ---- the arithmetic ---------------------------------------------------------------------------------------------
def test_row_wise_scales_and_saturation_against_float32(fp8):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen) * torch.logspace(-3, 2, 48).unsqueeze(1)   # rows 5 decades apart
    w[7] = 0.0                                                                         # an all-zero row
    q, scale = fp8.quantize_rows(w.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (48, 1)
    amax = w.to(torch.bfloat16).float().abs().amax(dim=1, keepdim=True)
    nonzero = amax.squeeze(1) > 0
    assert torch.allclose(scale[nonzero], amax[nonzero] / 448.0, rtol=1e-6)       # one scale per output row
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((47,), 448.0))   # each row's max → ±448
    assert torch.equal(q[7].float(), torch.zeros(64)) and torch.isfinite(scale).all()
    # e4m3 keeps 3 mantissa bits: every element within 2^-4 of itself (relative), or of the row's resolution
    back = q.float() * scale
    tolerance = 2 ** -4 * w.abs() + amax * 2 ** -9 + 1e-30
    assert ((back - w.to(torch.bfloat16).float()).abs() <= tolerance).all()
    # each row keeps its own resolution: per-tensor scaling would flush the small rows to zero
    assert (back[:8].abs().sum(dim=1)[torch.arange(8) != 7] > 0).all()
    # saturation: what lies beyond the range clamps to ±448, never NaN
    assert fp8.to_e4m3(torch.tensor([1e4, -1e4, 447.0, 500.0])).float().tolist() == [448.0, -448.0, 448.0, 448.0]


def test_fp8_linear_is_the_dequantized_product_and_compiles_in_one_graph(fp8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=gen) * torch.linspace(0.01, 10, 5).view(1, 5, 1)   # tokens of any scale
    w, b = torch.randn(32, 64, generator=gen) * 0.1, torch.randn(32, generator=gen)
    w8, ws = fp8.quantize_rows(w)
    out = fp8.fp8_linear(x, w8, ws.reshape(1, -1), b)
    x8, xs = fp8.quantize_rows(x.reshape(-1, 64))
    reference = ((x8.float() * xs) @ (w8.float() * ws).t() + b).reshape(2, 5, 32)   # float32, dequantized
    assert out.shape == (2, 5, 32) and rel(out, reference) < 1e-6
    exact = torch.nn.functional.linear(x, w, b)
    assert 1e-3 < rel(out, exact) < 0.06   # fp8 is not lossless, and close (e4m3: 3 mantissa bits)
    compiled = torch.compile(fp8.fp8_linear, backend="aot_eager", fullgraph=True)
    assert rel(compiled(x, w8, ws.reshape(1, -1), b), out) < 1e-6


def test_the_keep_lists_route_the_heavy_layers_and_keep_first_last_embedding_and_modulation(pack, fp8):
    from comfy_accel.accelerators.compile.dit import served_model
    from tools.model_factory import build_model

    flux = build_dit("tiny-flux-dev", seed=1)
    routed = {n for n, _ in fp8.candidate_layers(flux.model.diffusion_model, served_model(flux, "inductor", True))}
    assert "double_blocks.0.img_attn.qkv" in routed and "single_blocks.1.linear2" in routed
    assert not {"double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"} & routed
    whole = {n for n, _ in fp8.candidate_layers(flux.model.diffusion_model, None)}   # scope "whole"
    assert routed <= whole and not {"img_in", "txt_in", "final_layer.linear", "time_in.in_layer",
                                    "final_layer.adaLN_modulation.1", "guidance_in.out_layer"} & whole
    sdxl = build_model("tiny-sdxl", seed=1)
    names = {n for n, _ in fp8.candidate_layers(sdxl.model.diffusion_model, None)}
    assert {"output_blocks.0.1.transformer_blocks.0.ff.net.2", "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"} \
        <= names
    # only the feed-forwards: the attention projections are too narrow for fp8 to be faster (fp8.py KEEP)
    assert names and all(".ff.net." in n for n in names)
    wan = build_dit("tiny-wan21", seed=1)
    names = {n for n, _ in fp8.candidate_layers(wan.model.diffusion_model, None)}
    assert "blocks.0.self_attn.q" in names and "blocks.1.ffn.2" in names
    assert not [n for n in names if n.startswith(("head", "time_", "text_embedding", "patch_embedding"))]
    # a layer ComfyUI computes its own way this run (lowvram: LoRA applied per call) stays on its path
    layer = flux.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert fp8.runs_plain(layer, torch.device("cpu"))
    layer.weight_function = [lambda w: w]
    try:
        assert not fp8.runs_plain(layer, torch.device("cpu"))
    finally:
        layer.weight_function = []


# ---- the routing in the compiled lane -----------------------------------------------------------------------------
def fp8_lane(model, node_id, graphs: bool):
    """The inductor lane's session with precision fp8 on this CPU model (aot_eager for inductor; graphs: the
    graph path with `static_replay_class` captures)."""
    from comfy_accel.accelerators.compile.dit import served_model
    from comfy_accel.accelerators.compile.inductor import INDUCTOR, INDUCTOR_CUDAGRAPHS
    from comfy_accel.accelerators.compile.session import CompileSession, model_config_fields, parse_options
    from comfy_accel.accelerators.compile.stand_in import attach

    backend = INDUCTOR_CUDAGRAPHS if graphs else INDUCTOR
    parsed = parse_options({"fallback": "error", "node_id": node_id, "precision": "fp8"}, backend, cuda_graphs=graphs)
    session = CompileSession(aot_eager_compiler(parsed), parsed, model_config=model_config_fields(model),
                             served=served_model(model, backend, regional=True), device=torch.device("cpu"))
    if graphs:
        session.graphs.call_class = static_replay_class()
    return attach(model, session), session


def fp8_by_hooks(model, names):
    """`model` with the independent eager reference (tools.fp8_layer_error.fp8_from_live_weights) on `names`."""
    from tools.fp8_layer_error import fp8_from_live_weights

    fp8_from_live_weights(model, names)
    return model


def test_fp8_runs_in_the_compiled_flux_blocks_on_the_graph_path_and_a_lora_is_requantized(pack):
    from torch._dynamo.utils import counters

    model, twin = build_dit("tiny-flux-dev", seed=4), build_dit("tiny-flux-dev", seed=4, check_alive=False)
    plain = sample_dit(twin, steps=2)
    accelerated, session = fp8_lane(model, "fp8-flux", graphs=True)
    captures.clear()
    counters["graph_break"].clear()
    out = sample_dit(accelerated, steps=2)
    assert not counters["graph_break"], dict(counters["graph_break"])
    routed = sorted(session.fp8.routes)
    assert len(routed) == 20 and session.fp8.calls >= 2 and session.calls["graph"] == 2
    reference = fp8_by_hooks(build_dit("tiny-flux-dev", seed=4, check_alive=False), routed)
    assert rel(out, sample_dit(reference, steps=2)) < 1e-5     # exactly the fp8 arithmetic, on those layers
    assert 1e-4 < rel(out, plain) < 0.1                        # fp8 ran, and stays close
    assert {e["what"] for e in session.compiler.compile_events} == {"block DoubleStreamBlock",
                                                                     "block SingleStreamBlock"}
    compiled, captured = len(session.compiler.compile_events), len(captures)
    buffers = {n: r.stand_in.weight_fp8.data_ptr() for n, r in session.fp8.routes.items()}

    # a LoRA loaded after the node: re-quantized from the patched weights into the same buffers, no recompile,
    # no new capture; unloading it re-quantizes again
    lora = random_dit_lora(twin)
    with_lora_out = sample_dit(with_lora(accelerated, lora), steps=2)
    assert session.fp8.requantized > 0
    assert rel(with_lora_out, sample_dit(with_lora(reference, lora), steps=2)) < 1e-5
    assert rel(with_lora_out, out) > 1e-3
    assert len(session.compiler.compile_events) == compiled and len(captures) == captured
    assert {n: r.stand_in.weight_fp8.data_ptr() for n, r in session.fp8.routes.items()} == buffers
    before = session.fp8.requantized
    assert rel(sample_dit(accelerated, steps=2), out) < 1e-6 and session.fp8.requantized > before
    # the model's other clones never see the routing: the plain model is exactly as before
    assert torch.equal(sample_dit(model, steps=2), sample_dit(twin, steps=2))


def test_fp8_on_the_whole_compiled_sd15_unet_with_a_lora_after_the_node(pack):
    from comfy_accel.accelerators.compile.stand_in import sdpa_attention_override
    from tests.lora import TARGETS, make_lora
    from tools.model_factory import build_model, sample

    model = build_model("tiny-sd15", seed=8)
    accelerated, session = fp8_lane(model, "fp8-sd15", graphs=False)
    out = sample(accelerated, steps=2)
    routed = sorted(session.fp8.routes)
    assert len(routed) >= 10 and all(".ff.net." in n for n in routed)   # the feed-forwards (fp8.py KEEP)
    reference = fp8_by_hooks(build_model("tiny-sd15", seed=8, check_alive=False), routed)
    # the lane runs the host's SDPA attention where the CPU default is its chunked one (stand_in.py); the tiny
    # random UNet turns that last-bit difference into 9% once fp8 rounds it, so the reference runs the same
    reference.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        sdpa_attention_override
    assert rel(out, sample(reference, steps=2)) < 1e-5
    assert 1e-4 < rel(out, sample(build_model("tiny-sd15", seed=8, check_alive=False), steps=2)) < 0.3
    assert session.calls["compiled"] == 2 and session.calls["eager"] == 0
    compiled = len(session.compiler.compile_events)
    lora = make_lora(model, list(TARGETS))   # a routed Linear (ff.net.2), a kept one (attn2.to_k), convs, a bias
    assert "input_blocks.1.1.transformer_blocks.0.ff.net.2" in routed
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k" not in routed
    lora_out = sample(with_lora(accelerated, lora), steps=2)
    assert rel(lora_out, sample(with_lora(reference, lora), steps=2)) < 1e-5 and rel(lora_out, out) > 1e-3
    assert session.fp8.requantized >= 1 and len(session.compiler.compile_events) == compiled


# ---- where fp8 cannot run -----------------------------------------------------------------------------------------
def test_without_fp8_hardware_the_model_runs_its_dtype_and_says_why(pack, fp8, tiny_sd15):
    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.base import BackendUnavailable
    from comfy_accel.accelerators.compile.inductor import apply
    from comfy_accel.accelerators.compile.session import parse_options
    from comfy_accel.accelerators.compile.stand_in import session_of
    from comfy_accel.nodes.accelerate import AccelerateModel

    if torch.cuda.is_available():
        pytest.skip("this test checks the fallback where torch sees no CUDA GPU")
    here = fp8.available(torch.device("cpu"))
    assert not here and "CUDA GPU" in here.reason and "8.9" in here.reason
    out = apply(tiny_sd15, {"fallback": "eager", "node_id": "fp8-cpu", "precision": "fp8"})
    session = session_of(out)
    assert session.options.precision == "auto" and session.fp8 is None
    assert ("fp8", "warning", f"precision fp8: {here.reason}; running in the model's dtype") in notices("fp8-cpu")
    with pytest.raises(BackendUnavailable, match="precision fp8: .*CUDA GPU"):
        apply(tiny_sd15, {"fallback": "error", "precision": "fp8"})
    # the node: the input from options.py, and what it reports is what the session runs
    assert AccelerateModel.INPUT_TYPES()["optional"]["precision"][0] == ["auto", "fp8"]
    _, in_effect = accelerate(tiny_sd15, backend="inductor", precision="fp8", node_id="fp8-node")
    assert in_effect["precision"] == "auto" and "CUDA GPU" in in_effect["precision_unavailable"]
    # a backend that traces or builds ahead of time runs no per-call routing: it says so
    parsed = parse_options({"precision": "fp8", "fallback": "eager", "node_id": "fp8-sf"}, "stable-fast")
    assert fp8.precision_in_effect(parsed, None, torch_compile=False).precision == "auto"
    assert [m for _, _, m in notices("fp8-sf")] == ["precision fp8: stable-fast runs no fp8 layers (inductor and "
                                                    "inductor+cudagraphs do); running in the model's dtype"]


def test_the_record_says_fp8_only_when_fp8_layers_ran(pack):
    from comfy_accel.nodes.metadata import in_effect

    applied = {"accelerate_model": {"backend": "inductor+cudagraphs", "precision": "fp8"}}
    ran = in_effect(applied, {"accelerate_model": "5"}, [], fp8_ran=True)["accelerate_model"]
    assert (ran["used"], ran["precision"], ran["fallback"]) == ("inductor+cudagraphs + fp8", "fp8", None)
    why = {"accelerator": "fp8", "level": "warning", "node": "5", "message": "no linear layer ... ; running in "
                                                                            "the model's dtype"}
    not_ran = in_effect(applied, {"accelerate_model": "5"}, [why], fp8_ran=False)["accelerate_model"]
    assert not_ran["used"] == "inductor+cudagraphs" and not_ran["fallback"] is None   # not a backend fallback
    assert not_ran["precision"].startswith("model dtype (no linear layer")
    unavailable = {"accelerate_model": {"backend": "inductor", "precision": "auto",
                                        "precision_unavailable": "no CUDA GPU"}}
    assert in_effect(unavailable, {}, [])["accelerate_model"]["precision"] == "model dtype (fp8: no CUDA GPU)"


def test_the_webui_panel_carries_precision_and_its_infotext_says_fp8_only_when_it_ran(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError, Availability
    from comfy_accel.accelerators.settings import Settings
    from comfy_accel.accelerators.webui_mapping import PANEL_ORDER, infotext_to_panel, panel_to_plan

    assert "precision" in PANEL_ORDER
    plan = panel_to_plan({"enabled": True, "backend": "inductor", "precision": "fp8"}, settings=Settings(),
                         availability=lambda name: Availability(True, "here"), gpu=Availability(True, "gpu"))
    assert plan.step("inductor").options["precision"] == "fp8"
    ran = {"backend": "inductor", "deepcache": False, "cfg_cutoff": False, "taesd": False, "notes": []}
    assert "Accel precision" not in plan.infotext({**ran, "precision": "auto"})
    text = plan.infotext({**ran, "precision": "fp8"})
    assert text["Accel precision"] == "fp8" and infotext_to_panel(text)["precision"] == "fp8"
    with pytest.raises(AcceleratorInputError, match="unknown precision"):
        panel_to_plan({"enabled": True, "precision": "int4"}, settings=Settings())


def test_where_fp8_can_run_the_node_attaches_it_and_says_so(pack, fp8, monkeypatch):
    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.base import Availability
    from comfy_accel.accelerators.compile.stand_in import session_of
    from comfy_accel.nodes.metadata import fp8_calls

    monkeypatch.setattr(fp8, "available", lambda device=None: Availability(True, "fp8 here (test)"))
    flux = build_dit("tiny-flux-dev", seed=2)
    out, in_effect = accelerate(flux, backend="inductor", precision="fp8", node_id="fp8-attached")
    session = session_of(out)
    assert in_effect["precision"] == "fp8" and "precision_unavailable" not in in_effect
    assert session.options.precision == "fp8" and session.fp8 is not None and fp8_calls(out) == 0
    assert session.compiler.artifact_options()["precision"] == "fp8"   # fp8 code is cached apart from bf16
    _, plain = accelerate(flux, backend="inductor", node_id="fp8-not-asked")
    assert "precision" not in plain


def test_a_hook_lora_patched_between_the_calls_of_a_step_reaches_the_fp8_layers(pack):
    """ComfyUI's hook LoRAs (a LoRA on one conditioning) patch the weights before each call that needs them and
    restore them before the others: the fp8 copies follow through ON_APPLY_HOOKS, call by call."""
    import comfy.hooks

    from tools.dit_factory import make_dit_conditioning

    model = build_dit("tiny-flux-dev", seed=6)
    accelerated, session = fp8_lane(model, "fp8-hooks", graphs=True)
    lora = random_dit_lora(model, scale=0.6)

    def conditioning(patcher):
        positive, negative = make_dit_conditioning(patcher)
        return {"positive": comfy.hooks.set_hooks_for_conditioning(positive, comfy.hooks.create_hook_lora(
            lora, strength_model=1.0, strength_clip=0.0)), "negative": negative}

    plain = sample_dit(accelerated, steps=2, cfg=2.0)
    hooked = sample_dit(accelerated, steps=2, cfg=2.0, **conditioning(accelerated))
    routed = sorted(session.fp8.routes)
    reference = fp8_by_hooks(build_dit("tiny-flux-dev", seed=6, check_alive=False), routed)
    expected = sample_dit(reference, steps=2, cfg=2.0, **conditioning(reference))
    assert rel(hooked, plain) > 1e-3 and rel(hooked, expected) < 1e-5
    assert session.fp8.requantized > 0 and session.calls["eager"] == 0
    assert rel(sample_dit(accelerated, steps=2, cfg=2.0), plain) < 1e-6   # hooks gone: the base weights' copies
