"""The compile lane's warm-start artifacts keyed on the patch set: a compile with FreeU (or other factors, or
none) has its own cache entry, and a changed patch set is a miss that names the patch, never a "warm start"
from another set's entry. ComfyUI's own sampler and FreeU_V2 patch through the lane's stand-in; a compiler that
runs the UNet as it is, with a few-byte artifact, stands in for torch.compile (no compile)."""
import pytest

from tests.cache.workers import small_artifact_compiler

SHAPE = "batch 2, 64×64 px, 77 tokens"   # the tiny model at 64², CFG: cond and uncond in one call


@pytest.fixture
def first_run(pack, tiny_sd15, tmp_path):
    """first_run(FreeU factors or None, freeu_after_the_node) → the notices of one sampling run through a new
    session (a new process or node execution) on the tiny model with those factors."""
    from comfy_extras.nodes_freelunch import FreeU_V2

    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compile.session import Compiler, CompileSession, parse_options
    from comfy_accel.accelerators.compile.stand_in import attach
    from tools.model_factory import sample

    store = ArtifactStore(tmp_path / "store")

    def run(freeu: tuple | None, after_the_node: bool = False) -> list[str]:
        def with_freeu(model):
            return model if freeu is None else FreeU_V2().patch(model, *freeu)[0]

        options = parse_options({"fallback": "error", "node_id": "p"}, "inductor")
        session = CompileSession(small_artifact_compiler(Compiler)(options), options, get_store=lambda: store,
                                 model_config={"family": "sd15"})
        model = with_freeu(attach(tiny_sd15, session)) if after_the_node else attach(with_freeu(tiny_sd15), session)
        with events.collect() as raised:
            sample(model, steps=1)
        assert session.calls["compiled"] >= 1 and session.calls["eager"] == 0
        return [n["message"] for n in raised]

    run.store = store
    return run


def one(lines: list[str], start: str) -> str:
    found = [n for n in lines if n.startswith(start)]
    assert len(found) == 1, lines
    return found[0]


def test_a_patch_set_change_is_a_miss_naming_the_patch_and_each_set_keeps_its_entry(first_run):
    assert one(first_run(None), f"cache miss for {SHAPE}: ")
    freeu = first_run((1.3, 1.4, 0.9, 0.2), after_the_node=True)
    assert not [n for n in freeu if n.startswith("warm start")], freeu
    miss = one(freeu, f"cache miss for {SHAPE}: ")
    assert "option patches.output_block_patch none → comfy_extras.nodes_freelunch.FreeU_V2.patch." \
           "output_block_patch(scale_dict={128: (1.3, 0.9), 64: (1.4, 0.2)})" in miss, miss
    other = one(first_run((1.5, 1.4, 0.9, 0.2)), f"cache miss for {SHAPE}: ")
    assert "(scale_dict={128: (1.3, 0.9), 64: (1.4, 0.2)}) → " in other and "128: (1.5, 0.9)" in other, other
    assert len(first_run.store.entries()) == 3, "one entry per patch set, none overwritten"
    # each set starts warm from its own entry, FreeU before or after the node alike
    for freeu, after in ((None, False), ((1.3, 1.4, 0.9, 0.2), False), ((1.5, 1.4, 0.9, 0.2), True)):
        assert one(first_run(freeu, after), f"warm start: compiled artifacts for {SHAPE} loaded from the cache")
    assert sorted(e.hits for e in first_run.store.entries()) == [1, 1, 1]
