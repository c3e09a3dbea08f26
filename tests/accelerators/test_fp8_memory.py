"""precision fp8's copies and the host's memory (accelerators/compile/fp8_store.py) on the CPU, with the real
ComfyUI: the copies (and the session's graphs) are freed when the accelerated clone is gone; Accelerate Model
applied again to the same base model routes the same copies, never a second set; ComfyUI's real
`unload_all_models` frees every set of the model and the next run makes it again; ComfyUI's memory manager
counts each set once as a model of its own (its size the copies' bytes) and frees it when it unloads only that;
it is asked for the room before new copies are made; a dropped chain of clones (Step Cache under Accelerate Model) is
freed at once, leaving ComfyUI no record of a loaded clone that is gone (each such record costs every later
sample a full garbage collection)."""
import gc
import weakref

import torch

from tests.accelerators.test_compile_dit import captures, rel
from tests.accelerators.test_fp8 import fp8_lane
from tests.lora import with_lora
from tools.dit_factory import build_dit, random_dit_lora, sample_dit
from tools.comfy_host import dead_records


def fp8_buffers(session) -> list:
    return [t for r in session.fp8.routes.values() for t in (r.stand_in.weight_fp8, r.stand_in.weight_scale)]


def live_graph_entries(token: str) -> list:
    from comfy_accel.accelerators.cache.api import live_objects

    return [k for k in live_objects().keys() if isinstance(k, tuple) and k and k[0] == token]


def copies_bytes(*sessions) -> int:
    unique = {id(t): t for session in sessions for t in fp8_buffers(session)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def holder_records(*clones) -> list:
    """ComfyUI's records of the loaded models that are the fp8 copies' holders carried by `clones`."""
    import comfy.model_management as mm

    from comfy_accel.accelerators.compile.fp8_store import RESIDENCY_KEY

    holders = [h for clone in clones for h in clone.get_additional_models_with_key(RESIDENCY_KEY)]
    return [loaded for loaded in mm.current_loaded_models if any(loaded.model is h for h in holders)]


def dropped_at_once(held: list) -> bool:
    """Drops `held`'s references (the caller's only ones) with the garbage collector off: whether its first object
    was freed by reference counting alone."""
    watched = weakref.ref(held[0])
    gc.disable()
    try:
        held.clear()
        return watched() is None
    finally:
        gc.enable()


def collect():
    captures.clear()   # the CPU stand-in for a CUDA graph keeps its function (a real graph keeps no Python object)
    gc.collect()


def test_a_dropped_clone_frees_its_fp8_copies_and_its_graphs(pack):
    from comfy_accel.accelerators.cache.api import live_objects
    from comfy_accel.accelerators.compile.fp8_store import live_stores

    model = build_dit("tiny-flux-dev", seed=4)
    accelerated, session = fp8_lane(model, "fp8-dropped", graphs=True)
    out = sample_dit(accelerated, steps=2)
    buffers = [weakref.ref(t) for t in fp8_buffers(session)]
    token, graph = session.token, weakref.ref(next(iter(session.graphs.captured.values())))
    captures.clear()
    assert len(buffers) == 40 and session.calls["graph"] == 2 and live_graph_entries(token)
    assert live_stores(model.model.diffusion_model)

    # the live cache dropping a graph (evicted for its budget) frees it in the session, which keeps running
    for key in live_graph_entries(token):
        assert live_objects().release(key)
    assert not session.graphs.captured and graph() is None   # the graph itself freed
    assert rel(sample_dit(accelerated, steps=2), out) < 1e-6 and live_graph_entries(token)

    del accelerated, session
    collect()
    assert [r() for r in buffers] == [None] * 40   # nothing process-wide kept the session or its copies
    assert not live_graph_entries(token)
    assert not live_stores(model.model.diffusion_model)
    assert torch.equal(sample_dit(model, steps=2), sample_dit(build_dit("tiny-flux-dev", seed=4,
                                                                        check_alive=False), steps=2))


def test_accelerate_model_applied_again_to_the_same_model_routes_the_same_copies(pack):
    from comfy_accel.accelerators.compile.fp8_store import live_stores

    model = build_dit("tiny-flux-dev", seed=5)
    first, first_session = fp8_lane(model, "fp8-first", graphs=True)
    first_out = sample_dit(first, steps=2)
    second, second_session = fp8_lane(model, "fp8-again", graphs=True)   # a changed input: a new clone
    second_out = sample_dit(second, steps=2)
    assert rel(second_out, first_out) < 1e-6
    both = fp8_buffers(first_session) + fp8_buffers(second_session)
    assert len(both) == 80 and len({id(t) for t in both}) == 40   # one set of copies, routed by both sessions
    assert len(live_stores(model.model.diffusion_model)) == 1

    # the weights are the base model's: whichever session runs brings the shared copies up to date
    lora_out = sample_dit(with_lora(second, random_dit_lora(model)), steps=2)
    assert rel(lora_out, first_out) > 1e-3 and second_session.fp8.requantized > 0
    assert rel(sample_dit(first, steps=2), first_out) < 1e-6   # the LoRA gone: the copies are the base's again
    assert first_session.fp8.requantized > 0

    # the first clone dropped: the copies stay for the second, which still routes them
    kept = [weakref.ref(t) for t in fp8_buffers(second_session)]
    del first, first_session
    collect()
    assert all(r() is not None for r in kept) and rel(sample_dit(second, steps=2), first_out) < 1e-6


def test_comfyui_unloading_the_model_frees_every_set_and_the_next_run_makes_them_again(pack):
    import comfy.model_management as mm

    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.compile.fp8_store import live_stores

    model = build_dit("tiny-flux-dev", seed=6)
    first, first_session = fp8_lane(model, "fp8-unload-1", graphs=True)
    out = sample_dit(first, steps=2)
    second, second_session = fp8_lane(model, "fp8-unload-2", graphs=True)
    sample_dit(second, steps=2)
    buffers = [weakref.ref(t) for t in fp8_buffers(first_session) + fp8_buffers(second_session)]
    assert first_session.graphs.captured and second_session.graphs.captured

    mm.unload_all_models()   # ComfyUI's own call: detaches the loaded clone (its ON_DETACH callback)
    collect()
    assert [r() for r in buffers] == [None] * 80
    assert not first_session.fp8.routes and not second_session.fp8.routes
    assert not first_session.graphs.captured and not second_session.graphs.captured   # they read the freed copies
    assert not live_stores(model.model.diffusion_model)
    said = [n["message"] for n in events.recent(300) if n.get("node") in ("fp8-unload-1", "fp8-unload-2")]
    assert any(m.startswith("model unloaded: freed the fp8 copies") for m in said)

    # the next load: quantized again from the weights, graphs captured again, the same result
    assert rel(sample_dit(second, steps=2), out) < 1e-6 and len(second_session.fp8.routes) == 20
    assert rel(sample_dit(first, steps=2), out) < 1e-6 and len(first_session.fp8.routes) == 20
    assert second_session.graphs.captured and first_session.graphs.captured


def test_comfyui_counts_the_copies_as_a_model_and_unloading_only_them_frees_them(pack):
    import comfy.model_management as mm

    model = build_dit("tiny-flux-dev", seed=9)
    accelerated, session = fp8_lane(model, "fp8-counted", graphs=True)
    out = sample_dit(accelerated, steps=2)
    nbytes = copies_bytes(session)
    assert nbytes > 0 and session.fp8.store.nbytes == nbytes
    records = holder_records(accelerated)
    assert len(records) == 1 and records[0].model_memory() == records[0].model_loaded_memory() == nbytes

    # ComfyUI frees memory and unloads only the copies' holder (the model it samples with stays loaded)
    others = [loaded for loaded in mm.current_loaded_models if loaded not in records]
    unloaded = mm.free_memory(1e30, torch.device("cpu"), keep_loaded=others)
    assert [loaded.model for loaded in unloaded] == [records[0].model] and not holder_records(accelerated)
    assert session.fp8.store.nbytes == 0 and not session.fp8.routes and not session.graphs.captured
    assert any(loaded.model.model is model.model for loaded in mm.current_loaded_models)

    # the next sample loads the holder again and makes the copies again: the same result, the same size
    assert rel(sample_dit(accelerated, steps=2), out) < 1e-6 and len(session.fp8.routes) == 20
    records = holder_records(accelerated)
    assert len(records) == 1 and records[0].model_loaded_memory() == copies_bytes(session) == nbytes
    mm.unload_all_models()
    assert session.fp8.store.nbytes == 0 and not holder_records(accelerated)


def test_two_sessions_on_one_model_count_its_copies_once_and_dropping_one_leaves_no_dead_record(pack):
    import comfy.model_management as mm

    model = build_dit("tiny-flux-dev", seed=10)
    first, first_session = fp8_lane(model, "fp8-once-1", graphs=True)
    second, second_session = fp8_lane(model, "fp8-once-2", graphs=True)
    sample_dit(first, steps=2)
    sample_dit(second, steps=2)
    sample_dit(first, steps=2)
    nbytes = copies_bytes(first_session, second_session)
    assert nbytes == copies_bytes(first_session) > 0   # one set, routed by both
    records = holder_records(first, second)
    assert len(records) == 1 and records[0].model_memory() == records[0].model_loaded_memory() == nbytes

    # the clone whose holder ComfyUI holds now dropped (freed by reference counting alone): its record moves up
    # the holders' parent chain, never left "dead", and the copies stay counted for the second clone
    held = [first, first_session]
    del first, first_session
    assert dropped_at_once(held)
    collect()
    assert not dead_records()
    sample_dit(second, steps=2)
    records = holder_records(second)
    assert len(records) == 1 and records[0].model_memory() == copies_bytes(second_session) == nbytes
    mm.unload_all_models()


def test_comfyui_is_asked_for_room_before_new_copies_are_made(pack, monkeypatch):
    import comfy.model_management as mm

    asked = []
    real = mm.free_memory

    def free_memory(memory_required, device, keep_loaded=[]):   # ComfyUI's own, recorded
        asked.append((memory_required, device, [loaded.model for loaded in keep_loaded]))
        return real(memory_required, device, keep_loaded=keep_loaded)

    model = build_dit("tiny-flux-dev", seed=7)
    accelerated, session = fp8_lane(model, "fp8-room", graphs=False)
    helper = build_dit("tiny-flux-dev", seed=8, check_alive=False)   # a model the sampler loads with it (as a
    accelerated.set_additional_models("fp8-room-test", [helper])      # ControlNet or a model patch would be)
    monkeypatch.setattr(mm, "free_memory", free_memory)
    sample_dit(accelerated, steps=2)
    ours = [a for a in asked if a[0] > mm.minimum_inference_memory() and a[2]]
    assert len(ours) == 1
    needed, device, kept = ours[0]
    assert needed == session.fp8.store.nbytes + mm.minimum_inference_memory() and device == torch.device("cpu")
    # what this sampling loaded stays loaded: the model sampling now, the copies' holder, the sampler's other models
    holder = session.fp8.store.residency.module
    assert any(patcher.model is model.model for patcher in kept) and any(patcher is helper for patcher in kept)
    assert any(patcher.model is holder for patcher in kept)
    assert all(patcher.model is model.model or patcher is helper or patcher.model is holder for patcher in kept)
    sample_dit(accelerated, steps=2)
    assert len([a for a in asked if a[0] > mm.minimum_inference_memory() and a[2]]) == 1   # no new copies


def test_a_dropped_chain_of_clones_is_freed_at_once_and_later_samples_run_no_full_gc(pack, caplog):
    """The bench's fp8 + Step Cache stack ran 0.8 s a sample slower after the stack before it (the same chain in
    bf16) was dropped: the clone's own wrapper held the clone, so the chain was left to the garbage collector,
    which clears weak references before their callbacks run; ComfyUI's record of the loaded clone could then not
    move to a parent and stayed "dead", and `load_models_gpu` ran gc.collect() and emptied the CUDA cache before
    every later sample ("memory leak with model Flux"). Freed link by link, the record moves up to the base model."""
    import logging

    from comfy_accel.accelerators.step_cache import StepCacheConfig, apply

    model = build_dit("tiny-flux-dev", seed=4)
    chain, session = fp8_lane(apply(model, StepCacheConfig(cache_mode="interval", interval=2)), "fp8-chain",
                              graphs=True)
    sample_dit(chain, steps=2)
    held = [chain, session]
    del chain, session
    assert dropped_at_once(held)   # freed by reference counting alone, not by a collection
    collect()
    assert not dead_records()
    with caplog.at_level(logging.WARNING):
        sample_dit(model, steps=2)
    assert "memory leak" not in caplog.text
