"""The disk store on real files: round trips, corruption (flipped byte, truncation) → quarantine and rebuild,
version changes explained, the LRU disk budget, ids that try to leave the store, the JSON API."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from accelerators.cache import (ArtifactNotFound, ArtifactStore, InvalidArtifactId, api_clear, api_list, api_remove,
                                api_stats)
from tests.cache.cache_helpers import VERSIONS, make_key

PAYLOAD = os.urandom(64 * 1024)


def build_counter(calls: list, payload: bytes = PAYLOAD):
    def build(folder):
        calls.append(folder)
        (folder / "graph.bin").write_bytes(payload)
        return {"note": "test build"}
    return build


def test_put_get_round_trip_with_manifest(store, tmp_path):
    tensors = {"w": torch.arange(12, dtype=torch.float16).reshape(3, 4)}
    save_file(tensors, tmp_path / "weights.safetensors")
    key = make_key()
    entry = store.put(key, {"graph.bin": PAYLOAD, "refit/weights.safetensors": tmp_path / "weights.safetensors"})
    assert entry.path == store.root / "objects" / key.id
    assert sorted(entry.files) == ["graph.bin", "refit/weights.safetensors"]
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["key"] == key.fields and manifest["files"]["graph.bin"]["size"] == len(PAYLOAD)
    assert len(manifest["files"]["graph.bin"]["sha256"]) == 64 and manifest["hits"] == 0
    hit = store.get(key)
    assert hit.read_bytes("graph.bin") == PAYLOAD and hit.hits == 1
    assert torch.equal(hit.load_safetensors("refit/weights.safetensors")["w"], tensors["w"])
    assert store.get(key).hits == 2 and store.get(make_key(dtype="bfloat16")) is None


def test_get_or_build_builds_once_then_hits(store):
    calls = []
    entry, built = store.get_or_build(make_key(), build_counter(calls))
    assert built and entry.read_bytes("graph.bin") == PAYLOAD and entry.meta["note"] == "test build"
    result = store.get_or_build(make_key(), build_counter(calls))
    assert result.status == "hit" and not result.built and len(calls) == 1
    assert list((store.root / "staging").iterdir()) == []


def test_flipped_byte_is_quarantined_reported_and_rebuilt(store, caplog):
    key = make_key()
    entry = store.put(key, {"graph.bin": PAYLOAD})
    with open(entry.files["graph.bin"], "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0x01]))
    with caplog.at_level(logging.WARNING, logger="comfy_accel.cache"):
        lookup = store.lookup(key)
    assert lookup.entry is None and "graph.bin failed its sha256 check" in lookup.reason
    assert "quarantine" in lookup.reason and "sha256" in caplog.text
    assert not (store.root / "objects" / key.id).exists()
    [quarantined] = store.quarantined()
    assert quarantined["id"] == key.id and "sha256" in quarantined["reason"] and store.stats()["quarantined"] == 1
    calls = []
    result = store.get_or_build(key, build_counter(calls))
    assert result.built and len(calls) == 1 and result.entry.read_bytes("graph.bin") == PAYLOAD
    assert store.get(key) is not None


def test_listed_entries_are_verified_before_their_payloads_are_read(store):
    good, bad = make_key(options={"n": 1}), make_key(options={"n": 2})
    store.put(good, {"graph.bin": PAYLOAD})
    damaged = store.put(bad, {"graph.bin": PAYLOAD})
    damaged.files["graph.bin"].write_bytes(PAYLOAD[:-1] + b"!")
    listed = {entry.id: entry for entry in store.entries()}  # listing reads no payload: both still listed
    assert listed[good.id].read_bytes("graph.bin") == PAYLOAD and store.entry(good.id).hits == 1
    with pytest.raises(ArtifactNotFound, match="failed its sha256 check"):
        listed[bad.id].read_bytes("graph.bin")
    assert [q["id"] for q in store.quarantined()] == [bad.id] and [e.id for e in store.entries()] == [good.id]


def test_quarantine_keeps_only_the_newest_failures(store):
    for round_ in range(10):
        key = make_key(options={"n": round_})
        entry = store.put(key, {"graph.bin": PAYLOAD})
        entry.files["graph.bin"].write_bytes(b"garbage")
        assert store.get(key) is None
    kept = store.quarantined()
    assert len(kept) == 8 and kept[0]["id"] == make_key(options={"n": 9}).id
    assert all("graph.bin is truncated" in q["reason"] for q in kept)


def test_truncated_payload_is_never_loaded(store):
    key = make_key()
    entry = store.put(key, {"graph.bin": PAYLOAD, "meta.json": b"{}"})
    with open(entry.files["graph.bin"], "r+b") as handle:
        handle.truncate(len(PAYLOAD) // 3)
    lookup = store.lookup(key)
    assert lookup.entry is None
    assert f"graph.bin is truncated ({len(PAYLOAD) // 3} of {len(PAYLOAD)} bytes)" in lookup.reason
    result = store.get_or_build(key, build_counter([]))
    assert result.built and result.entry.read_bytes("graph.bin") == PAYLOAD


@pytest.mark.parametrize("damage", ["delete manifest", "garble manifest", "delete payload"])
def test_broken_manifest_or_missing_payload_is_quarantined(store, damage):
    key = make_key()
    entry = store.put(key, {"graph.bin": PAYLOAD})
    if damage == "delete manifest":
        (entry.path / "manifest.json").unlink()
    elif damage == "garble manifest":
        (entry.path / "manifest.json").write_text('{"id": ')
    else:
        entry.files["graph.bin"].unlink()
    lookup = store.lookup(key)
    assert lookup.entry is None and "corrupt" in lookup.reason and store.quarantined()
    assert store.entries() == []


def test_version_change_misses_with_the_field_and_keeps_the_old_entry(store):
    old = make_key()
    store.put(old, {"graph.bin": PAYLOAD})
    new = make_key(versions={**VERSIONS, "torch": "2.12"})
    assert store.get(new) is None
    assert store.explain_miss(new) == ["torch 2.11 → 2.12"]
    result = store.get_or_build(new, build_counter([]))
    assert result.built and result.miss_reasons == ["torch 2.11 → 2.12"] and "torch 2.11 → 2.12" in result.reason
    assert {e.id for e in store.entries()} == {old.id, new.id}  # the old one stays until evicted
    other_accelerator = make_key(accelerator="tensorrt")
    assert store.explain_miss(other_accelerator) == ["no tensorrt artifact in the cache yet"]
    assert store.explain_miss(old) == []


def test_profile_miss_is_explained_and_a_covering_entry_is_found(store):
    wide = make_key(profile={"batch": [1, 4], "height": [512, 1024], "width": [512, 1024]})
    store.put(wide, {"engine.plan": PAYLOAD})
    request = make_key(profile={"batch": 1, "height": 768, "width": 768})
    assert store.get(request) is None
    assert store.get_covering(request, {"batch": 1, "height": 768, "width": 768}).id == wide.id
    assert store.get_covering(request, {"height": 1536}) is None
    narrow = make_key(profile={"height": 512, "width": 512})
    assert store.explain_miss(make_key(profile={"height": 1536, "width": 512})) == [
        "profile height 512..1024 does not cover 1536"]
    store.put(narrow, {"engine.plan": PAYLOAD})
    assert store.get_covering(request, {"height": 512, "width": 512}).id == narrow.id  # tightest first


def test_disk_budget_evicts_least_recently_used(tmp_path):
    store = ArtifactStore(tmp_path / "cache", budget_bytes=2 * len(PAYLOAD) + 100)
    first, second, third, fourth = (make_key(options={"n": i}) for i in range(4))
    store.put(first, {"graph.bin": PAYLOAD})
    store.put(second, {"graph.bin": PAYLOAD})
    store.put(third, {"graph.bin": PAYLOAD})
    assert {e.id for e in store.entries()} == {second.id, third.id}  # oldest went, newest kept
    assert store.get(second) is not None  # used again: now third is the least recent
    store.put(fourth, {"graph.bin": PAYLOAD})
    assert {e.id for e in store.entries()} == {second.id, fourth.id}
    assert store.stats()["total_bytes"] == 2 * len(PAYLOAD)
    huge = make_key(options={"n": "huge"})
    store.put(huge, {"graph.bin": PAYLOAD * 3})  # alone over budget: kept, everything else goes
    assert [e.id for e in store.entries()] == [huge.id]
    store.budget_bytes = 10
    assert store.evict_to_budget() == [huge.id]


@pytest.mark.parametrize("bad", ["../x", "../../etc", "/etc/passwd", "/tmp", "objects", ".", "..", "..\\x",
                                 "a" * 63, "A" * 64, "a" * 64 + "/../x"])
def test_ids_that_could_name_a_path_are_rejected(store, tmp_path, bad):
    entry = store.put(make_key(), {"graph.bin": PAYLOAD})
    outside = tmp_path / "x"
    outside.mkdir()
    with pytest.raises(InvalidArtifactId) as err:
        store.remove(bad)
    assert isinstance(err.value, ValueError) and "invalid artifact id" in str(err.value)
    with pytest.raises(InvalidArtifactId):
        api_remove(store, bad)
    assert outside.is_dir() and entry.path.is_dir() and store.get(make_key()) is not None


def test_api_functions_return_json_and_typed_errors(store):
    keys = [make_key(options={"n": i}) for i in range(2)]
    for key in keys:
        store.put(key, {"graph.bin": PAYLOAD})
    listing = json.loads(json.dumps(api_list(store)))
    assert listing["count"] == 2 and listing["total_bytes"] == 2 * len(PAYLOAD)
    row = listing["entries"][0]
    assert row["accelerator"] == "inductor" and row["profile"]["height"] == [512, 512] and row["files"]
    assert {"id", "size_bytes", "last_used", "hits", "created", "key", "versions", "device"} <= set(row)
    stats = json.loads(json.dumps(api_stats(store)))
    assert stats["count"] == 2 and stats["by_accelerator"]["inductor"]["count"] == 2 and stats["budget_bytes"] == 10**9
    assert api_remove(store, keys[0].id) == {"removed": keys[0].id}
    with pytest.raises(ArtifactNotFound) as err:
        api_remove(store, keys[0].id)
    assert err.value.status == 404 and err.value.as_dict()["status"] == 404
    assert api_clear(store) == {"removed": 1} and api_list(store)["entries"] == []


def test_failed_build_leaves_nothing_and_releases_the_lock(store):
    def failing(folder):
        (folder / "graph.bin").write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        store.get_or_build(make_key(), failing)
    assert store.entries() == [] and list((store.root / "staging").iterdir()) == []
    assert store.get_or_build(make_key(), build_counter([]), lock_timeout=1).built


@pytest.mark.parametrize("name", ["../evil", "/abs", "manifest.json", ".hidden"])
def test_payload_names_stay_inside_the_entry(store, name):
    with pytest.raises(ValueError):
        store.put(make_key(), {name: b"x"})
    assert store.entries() == [] and not (store.root.parent / "evil").exists()


def test_a_stale_or_broken_index_is_harmless(tmp_path):
    root = tmp_path / "cache"
    writer, reader = ArtifactStore(root), ArtifactStore(root)  # two processes' views of one folder
    keys = [make_key(options={"n": i}) for i in range(3)]
    for key in keys[:2]:
        writer.put(key, {"graph.bin": PAYLOAD})
    assert {e.id for e in reader.entries()} == {keys[0].id, keys[1].id}
    writer.put(keys[2], {"graph.bin": PAYLOAD})
    writer.remove(keys[0].id)
    assert {e.id for e in reader.entries()} == {keys[1].id, keys[2].id}
    writer.get(keys[1])
    assert {e.id: e.hits for e in reader.entries()}[keys[1].id] == 1
    (root / "index.json").write_text("not json")
    assert {e.id for e in ArtifactStore(root).entries()} == {keys[1].id, keys[2].id}
    (root / "index.json").unlink()
    fresh = ArtifactStore(root)
    assert fresh.get_covering(keys[1], {"batch": 1}) is not None and len(fresh.entries()) == 2
    fresh.flush()
    assert len(json.loads((root / "index.json").read_text())["records"]) == 2


def test_clear_keeps_other_files_of_the_folder(store):
    store.put(make_key(), {"graph.bin": PAYLOAD})
    (store.root / "settings.json").write_text("{}")  # the hosts keep their settings beside the store
    assert store.clear() == 1 and store.entries() == [] and (store.root / "settings.json").exists()
