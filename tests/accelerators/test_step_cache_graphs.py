"""Step Cache on the compile lane's CUDA-graph path (the capture path run on this CPU with `static_replay_class`,
dynamo's aot_eager for inductor): in either order with Accelerate Model, a skipped call never enters the model, a
full call replays its bucket's graph (never compiled-without-graph nor eager), one capture per bucket, and the
result is the same stack run eager; with CFG Cutoff the batch-2 and batch-1 calls keep caches and graphs apart.
What Step Cache puts into the options (the step tracker) is per-run state: no graph is keyed on it."""
import pytest
import torch

from tests.accelerators.test_compile_dit import captures, graph_lane, rel
from tests.accelerators.test_step_cache import counted
from tools.dit_factory import build_dit, sample_dit
from tools.model_factory import build_model, sample

INTERVAL_3 = dict(cache_mode="interval", interval=3, start=0.0, end=1.0)


def step_cache(model, **settings):
    from comfy_accel.accelerators.step_cache import StepCacheConfig, apply

    return apply(model, StepCacheConfig(**settings))


def stacked(model, order: str, node_id: str, **settings):
    """(Step Cache and the graph lane on `model` in `order`, the lane's session)."""
    if order == "cache first":
        return graph_lane(step_cache(model, **settings), node_id)
    accelerated, session = graph_lane(model, node_id)
    return step_cache(accelerated, **settings), session


def last_run(model):
    from comfy_accel.accelerators.step_cache import step_cache_state

    return step_cache_state(model).last_run


# (run(), how many times the diffusion model's forward ran): on this CPU each replay runs it, and each capture
# once more (its recording); a skipped call never does
forwards = counted


BUILDS = {
    "tiny-flux-dev": (lambda seed, alive=True: build_dit("tiny-flux-dev", seed=seed, check_alive=alive),
                      lambda model, **kw: sample_dit(model, **kw)),
    "tiny-sd15": (lambda seed, alive=True: build_model("tiny-sd15", seed=seed, check_alive=alive),
                  lambda model, **kw: sample(model, **kw)),
}


@pytest.mark.parametrize("order", ["cache first", "compile first"])
@pytest.mark.parametrize("name", list(BUILDS))
def test_skipped_calls_stay_off_the_model_and_full_calls_replay_the_graph(pack, name, order):
    """Interval 3 over 7 steps: steps 0, 3, 6 run (three replays of one captured graph), four never reach the
    model; the result is the same stack run eager."""
    build, run = BUILDS[name]
    model, twin = build(seed=11), build(seed=11, alive=False)
    captures.clear()
    accelerated, session = stacked(model, order, f"sc-graph-{name}-{order}", **INTERVAL_3)
    out, ran = forwards(model, lambda: run(accelerated, steps=7))
    assert len(captures) == 1 and len(session.graphs.keys) == 1
    assert session.calls["graph"] == 3 and ran == 3 + 1, (ran, session.calls)   # 3 replays + the recording
    assert session.calls["compiled"] == session.calls["eager"] == 0
    assert (last_run(accelerated)["skipped_steps"], last_run(accelerated)["ran"]) == (4, 3)
    assert rel(out, run(step_cache(twin, **INTERVAL_3), steps=7)) < 1e-5
    # a second run replays the same graph: nothing Step Cache put into the options keyed a new one
    again, ran = forwards(model, lambda: run(accelerated, steps=7))
    assert rel(again, out) < 1e-6 and ran == 3 and len(captures) == 1 and session.calls["graph"] == 6
    (key,) = session.graphs.keys
    assert "transformer_options" not in dict(key[2])   # nothing of the step cache's (or the tracker's) is baked


@pytest.mark.parametrize("order", ["cache first", "compile first"])
def test_cfg_cutoff_step_cache_and_graphs_keep_batch_2_and_batch_1_apart(pack, order):
    """CFG Cutoff at 50% of 8 steps, Step Cache interval 3: batch 2 runs steps 0 and 3, the first batch-1 step
    (4) finds no entry of its own composition and runs, then 6 does: four replays over two graphs (batch 2 and
    batch 1), the same as the stack run eager."""
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig
    from comfy_accel.accelerators.cfg_cutoff import apply as cutoff

    model, twin = build_dit("tiny-flux-dev", seed=12), build_dit("tiny-flux-dev", seed=12, check_alive=False)
    captures.clear()
    accelerated, session = stacked(cutoff(model, CFGCutoffConfig(cutoff_percent=50.0)), order,
                                   f"sc-cutoff-graph-{order}", **INTERVAL_3)
    rows = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        out = sample_dit(accelerated, steps=8, cfg=3.0)
    finally:
        handle.remove()
    assert rows == [2, 2, 2, 1, 1, 1]   # each graph's recording, then its replays
    assert session.calls["graph"] == 4 and session.calls["compiled"] == session.calls["eager"] == 0
    assert sorted(key[0][0] for key in session.graphs.keys) == [1, 2] and len(captures) == 2
    assert last_run(accelerated)["skipped_steps"] == 4
    eager = step_cache(cutoff(twin, CFGCutoffConfig(cutoff_percent=50.0)), **INTERVAL_3)
    assert rel(out, sample_dit(eager, steps=8, cfg=3.0)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (torch sees none here)")
@pytest.mark.parametrize("settings", [INTERVAL_3, dict(threshold=0.2, start=0.0)], ids=["interval", "adaptive"])
def test_on_a_gpu_full_calls_replay_cuda_graphs(pack, settings):
    """The real thing (GPU only): Step Cache before inductor+cudagraphs on tiny Flux-dev in fp16, 8 steps: every
    full call a graph replay, the result that of the compiled model without graphs under the same step cache,
    and the adaptive rule's reads one per full call at most (none per step)."""
    from comfy_accel.accelerators import step_cache as step_cache_module
    from comfy_accel.accelerators.compile.inductor import apply, apply_cudagraphs
    from comfy_accel.accelerators.compile.stand_in import session_of

    model = build_dit("tiny-flux-dev", seed=4, dtype=torch.float16, device="cuda", smooth=True)
    graphed = apply_cudagraphs(step_cache(model, **settings), {"fallback": "error", "node_id": "gpu-sc"})
    plain = apply(step_cache(model, **settings), {"fallback": "error"})
    sample_dit(graphed, steps=8)   # captures
    reads, real = [], step_cache_module.read_host
    step_cache_module.read_host = lambda lagged: reads.append(1) or real(lagged)
    try:
        out = sample_dit(graphed, steps=8)
    finally:
        step_cache_module.read_host = real
    session, run = session_of(graphed), last_run(graphed)
    assert session.calls["graph"] == 2 * run["ran"] and session.calls["compiled"] == 0, session.calls
    assert len(reads) <= max(run["ran"] - 2, 0)
    assert rel(out, sample_dit(plain, steps=8)) < 1e-2
