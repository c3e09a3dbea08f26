"""The compile lane on every DiT family ComfyUI 0.3.75 builds (CPU, the real sampler): compiled block by block,
it matches eager at two resolutions (two frame counts for video), with no graph break inside the repeated blocks,
a bounded number of compiles per shape bucket and none on reuse, and a LoRA loaded after the node applied exactly
as in eager. Dynamo's `aot_eager` backend traces the same graphs, breaks and guards as inductor without its code
generation, so the whole lane runs here in seconds per family; `test_torch_compile.py` covers inductor itself.
"""
import pytest
import torch

from tests.lora import with_lora
from tools.dit_factory import DIT_SPECS, build_dit, random_dit_lora, sample_dit

# one image and one video DiT in the default run; the other families (10-35 s each) are marked slow
QUICK = ("tiny-flux-dev", "tiny-wan21")
FAMILIES = [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow)
            for name in DIT_SPECS if name.startswith("tiny-")]
# graph breaks inside a repeated block, by family: what dynamo cannot trace there (checked, so a fix shows)
KNOWN_BREAKS = {"tiny-hidream": "Dynamic shape operator"}   # its mixture-of-experts routing (aten.nonzero)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def notices(node):
    from comfy_accel.accelerators import events

    return [n["message"] for n in events.recent(300) if n.get("node") == node]


def aot_eager_lane(model, node_id, **options):
    """Accelerate Model's inductor lane (`torch_compile.apply`) with dynamo's aot_eager in place of inductor."""
    from comfy_accel.accelerators.compile.session import apply_backend
    from comfy_accel.accelerators.compile.inductor import INDUCTOR, InductorCompiler, available

    class AotEagerCompiler(InductorCompiler):
        def _backend(self, label):
            from torch._dynamo.backends.debugging import aot_eager

            def backend(graph_module, example_inputs):
                self.compile_events.append({"what": label, "inputs": []})
                return aot_eager(graph_module, example_inputs)

            return backend

    return apply_backend(model, {"fallback": "error", "node_id": node_id, **options}, INDUCTOR, available,
                         AotEagerCompiler, cuda_graphs=False, regional=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_dit_family_compiles_by_blocks_matches_eager_and_takes_a_lora(pack, name):
    from torch._dynamo.utils import counters

    from comfy_accel.accelerators.compile.stand_in import session_of

    video = DIT_SPECS[name].video
    # the second bucket differs after every family's padding (Z-Image pads tokens to multiples of 32)
    shapes = [dict(height=8, width=8, frames=3 if video else 1), dict(height=16, width=12, frames=5 if video else 1)]
    model, twin = build_dit(name, seed=3), build_dit(name, seed=3, check_alive=False)
    node = f"dit-{name}"
    accelerated = aot_eager_lane(model, node)
    session = session_of(accelerated)
    assert session is not None and session.by_blocks
    block_classes = {cls for _, cls, _ in session.served.blocks}
    assert any(f"compiles {DIT_SPECS[name].config_class}"[:18] in n and "block by block" in n for n in notices(node))

    counters["graph_break"].clear()
    per_bucket = []
    for shape in shapes:
        before = len(session.compiler.compile_events)
        out = sample_dit(accelerated, steps=2, **shape)   # step 2 reuses step 1's graphs
        per_bucket.append(len(session.compiler.compile_events) - before)
        assert rel(out, sample_dit(twin, steps=2, **shape)) < 1e-5, shape
    breaks = "; ".join(counters["graph_break"])
    if name in KNOWN_BREAKS:
        assert KNOWN_BREAKS[name] in breaks
    else:
        # each block class compiles once per bucket; twice where its first block gets inputs of other strides
        # (Wan), once per configuration where one class serves several lists (Lumina's refiners without
        # modulation); never a compile per block
        block_lists = len(session.served.blocks)
        assert all(len(block_classes) <= n <= 2 * block_lists for n in per_bucket), per_bucket
        assert not breaks, breaks
    assert {e["what"] for e in session.compiler.compile_events} == {f"block {cls}" for cls in block_classes}
    again = len(session.compiler.compile_events)
    sample_dit(accelerated, steps=1, **shapes[0])
    assert len(session.compiler.compile_events) == again   # a bucket seen before compiles nothing
    assert session.calls["eager"] == 0

    # a LoRA loaded after the node reaches the compiled blocks (patched in place), exactly as in eager
    lora = random_dit_lora(twin)
    eager_lora = sample_dit(with_lora(twin, lora), steps=2, **shapes[0])
    assert rel(eager_lora, sample_dit(twin, steps=2, **shapes[0])) > 1e-3
    assert rel(sample_dit(with_lora(accelerated, lora), steps=2, **shapes[0]), eager_lora) < 1e-5
    assert len(session.compiler.compile_events) == again


def test_a_model_a_backend_cannot_serve_runs_eager_with_one_line_naming_it(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.compile.stable_fast import apply as apply_stable_fast

    flux = build_dit("tiny-flux-schnell", seed=5)
    plain = apply_stable_fast(flux, {"fallback": "eager", "node_id": "sf-flux"})
    lines = [n for n in notices("sf-flux") if "FluxSchnell" in n]
    assert lines == ["stable-fast serves SD1.x/SD2.x/SDXL UNet models only; this MODEL is FluxSchnell (Flux); "
                     "running eager"]
    assert torch.equal(sample_dit(plain, steps=1), sample_dit(flux, steps=1))
    with pytest.raises(AcceleratorInputError, match="this MODEL is FluxSchnell"):
        apply_stable_fast(flux, {"fallback": "error"})


def test_what_the_lane_serves_and_what_the_node_reports(pack, tiny_sd15):
    from comfy_accel.accelerators.accelerate import accelerate
    from comfy_accel.accelerators.compile.dit import BLOCKS, WHOLE, served_model

    flux = build_dit("tiny-flux-dev", seed=5)
    served = served_model(flux, "inductor", regional=True)
    assert served.scope == BLOCKS and served.blocks == (("double_blocks", "DoubleStreamBlock", 2),
                                                        ("single_blocks", "SingleStreamBlock", 2))
    assert served_model(flux, "inductor", regional=True, scope=WHOLE).scope == WHOLE
    assert served_model(tiny_sd15, "inductor", regional=True).scope == WHOLE
    hidream = served_model(build_dit("tiny-hidream", seed=5), "inductor", regional=True)
    assert [name for name, _, _ in hidream.blocks] == ["double_stream_blocks", "single_stream_blocks"]  # no helpers

    _, in_effect = accelerate(flux, backend="inductor", node_id="node-flux")
    assert in_effect["compiles"] == ("Flux block by block (2 DoubleStreamBlock, 2 SingleStreamBlock; one compile "
                                     "per block class and shape)")
    _, in_effect = accelerate(tiny_sd15, backend="inductor")
    assert in_effect["compiles"] == "the whole UNetModel (SD15)"


def test_core_torch_compile_and_accelerate_model_never_both_compile_one_model(pack):
    """Core's TorchCompileModel before the node is replaced by it (one line says so); applied after the node, core's
    compiled model runs and the node stands aside (one line): never two compilers tracing one model."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy.patcher_extension import WrappersMP

    from comfy_accel.accelerators.compile.stand_in import CORE_COMPILE_KEY, session_of

    flux, twin = build_dit("tiny-flux-schnell", seed=9), build_dit("tiny-flux-schnell", seed=9, check_alive=False)
    eager = sample_dit(twin, steps=1)
    core_first = flux.clone()
    set_torch_compile_wrapper(core_first, backend="aot_eager")
    ours = aot_eager_lane(core_first, "core-then-ours")
    assert not ours.get_wrappers(WrappersMP.APPLY_MODEL, CORE_COMPILE_KEY)
    assert rel(sample_dit(ours, steps=1), eager) < 1e-5 and session_of(ours).compiler.compile_events
    assert any("replaces ComfyUI's TorchCompileModel" in n for n in notices("core-then-ours"))

    core_after = aot_eager_lane(flux, "ours-then-core")
    set_torch_compile_wrapper(core_after, backend="eager")   # dynamo without AOT: the cheapest real compile
    assert rel(sample_dit(core_after, steps=1), eager) < 1e-5
    assert not session_of(core_after).compiler.compile_events
    assert any("Accelerate Model stands aside" in n for n in notices("ours-then-core"))
