"""LiveObjectCache: least-recently-used eviction by bytes, on_evict on every drop, release when a model unloads."""
from __future__ import annotations

import logging

from accelerators.cache import LiveObjectCache


class Engine:
    """Stands for a compiled module or a TensorRT engine: records when it was freed."""

    def __init__(self, name: str):
        self.name = name
        self.freed = False


def recorder(log: list):
    def on_evict(key, obj):
        obj.freed = True
        log.append(key)
    return on_evict


def test_byte_budget_evicts_least_recently_used_and_calls_on_evict():
    evicted: list = []
    cache = LiveObjectCache(budget_bytes=300)
    engines = {name: Engine(name) for name in "abcd"}
    for name in "abc":
        assert cache.put(name, engines[name], 100, on_evict=recorder(evicted)) == []
    assert cache.get("a") is engines["a"]  # a is now the most recent; b the least
    assert cache.put("d", engines["d"], 100, on_evict=recorder(evicted)) == ["b"]
    assert evicted == ["b"] and engines["b"].freed and not engines["a"].freed
    assert cache.keys() == ["c", "a", "d"] and cache.total_bytes == 300 and cache.get("b") is None
    assert cache.put("big", Engine("big"), 250, on_evict=recorder(evicted)) == ["c", "a", "d"]
    assert evicted == ["b", "c", "a", "d"] and len(cache) == 1


def test_an_object_over_the_whole_budget_is_kept_alone():
    evicted: list = []
    cache = LiveObjectCache(budget_bytes=100)
    cache.put("small", Engine("small"), 10, on_evict=recorder(evicted))
    cache.put("huge", Engine("huge"), 1000, on_evict=recorder(evicted))
    assert evicted == ["small"] and cache.keys() == ["huge"]
    assert cache.stats() == {"count": 1, "total_bytes": 1000, "budget_bytes": 100}


def test_release_and_release_matching_free_the_objects_of_an_unloaded_model():
    evicted: list = []
    cache = LiveObjectCache(budget_bytes=10**9)
    for key in [("model-1", "b1"), ("model-1", "b2"), ("model-2", "b1")]:
        cache.put(key, Engine(str(key)), 10, on_evict=recorder(evicted))
    assert cache.release(("model-2", "b1")) and not cache.release(("model-2", "b1"))
    assert cache.release_matching(lambda key: key[0] == "model-1") == [("model-1", "b1"), ("model-1", "b2")]
    assert evicted == [("model-2", "b1"), ("model-1", "b1"), ("model-1", "b2")] and len(cache) == 0


def test_replacing_a_key_frees_the_old_object_and_budget_changes_apply():
    evicted: list = []
    cache = LiveObjectCache(budget_bytes=1000)
    old, new = Engine("old"), Engine("new")
    cache.put("k", old, 400, on_evict=recorder(evicted))
    cache.put("k", new, 500, on_evict=recorder(evicted))
    assert old.freed and not new.freed and cache.get("k") is new and cache.total_bytes == 500
    cache.put("other", Engine("other"), 400)  # no on_evict: dropped silently
    assert cache.set_budget(600) == ["k"] and new.freed and cache.keys() == ["other"]
    assert cache.clear() == 1 and len(cache) == 0


def test_a_failing_on_evict_is_logged_and_the_cache_stays_consistent(caplog):
    def broken(key, obj):
        raise RuntimeError("cudaFree failed")

    cache = LiveObjectCache(budget_bytes=100)
    cache.put("a", Engine("a"), 80, on_evict=broken)
    with caplog.at_level(logging.ERROR, logger="comfy_accel.cache"):
        assert cache.put("b", Engine("b"), 80) == ["a"]
    assert "on_evict for 'a' failed" in caplog.text and cache.keys() == ["b"] and cache.total_bytes == 80
