"""Artifact keys: ids, readable fields, profile coverage, miss explanations, ids that could name a path."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from accelerators.cache import (ArtifactKey, InvalidArtifactId, describe_differences, environment_fields,
                                profile_covers, resolve_cache_root, set_host_version, validate_id)
from accelerators.cache import environment
from tests.cache.cache_helpers import VERSIONS, make_key


def test_id_is_sha256_hex_of_the_fields_and_ignores_dict_order():
    key = make_key()
    assert len(key.id) == 64 and int(key.id, 16) >= 0
    reordered = make_key(options={"mode": "max-autotune-no-cudagraphs"},
                         model_config={"context_dim": 768, "model_channels": 320, "family": "sd15"})
    assert reordered.id == key.id
    assert ArtifactKey.from_fields(json.loads(json.dumps(key.fields))).id == key.id  # survives the manifest


@pytest.mark.parametrize("change", [
    {"accelerator": "tensorrt"}, {"options": {"mode": "default"}}, {"model_config": {"family": "sdxl"}},
    {"weights": "s1:" + "cd" * 16}, {"dtype": "bfloat16"}, {"profile": {"batch": [1, 1]}},
    {"device": {"type": "cuda", "name": "NVIDIA A100", "capability": "8.0"}},
    {"versions": {**VERSIONS, "torch": "2.12"}}, {"extra_versions": {"tensorrt": "10.3"}},
])
def test_every_field_changes_the_id(change):
    assert make_key(**change).id != make_key().id


def test_defaults_come_from_this_process():
    key = ArtifactKey.build(accelerator="inductor", dtype=torch.float16, extra_versions={"tensorrt": "10.3"})
    env = environment_fields()
    assert key.fields["device"] == env["device"]
    assert env["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert key.fields["versions"]["torch"] == torch.__version__
    assert key.fields["versions"]["tensorrt"] == "10.3"
    assert key.fields["versions"]["comfy_accel"] == "0.1.0"
    assert key.fields["dtype"] == "float16"
    assert ArtifactKey.build(accelerator="x", device="cpu", versions={}).fields["device"]["type"] == "cpu"


def test_host_version_is_part_of_the_key(monkeypatch):
    monkeypatch.setattr(environment, "_host", None)
    monkeypatch.delitem(sys.modules, "comfyui_version", raising=False)  # an imported ComfyUI names itself
    before = ArtifactKey.build(accelerator="inductor")
    set_host_version("comfyui", "0.3.75")
    after = ArtifactKey.build(accelerator="inductor")
    assert after.fields["versions"]["host"] == "comfyui 0.3.75" and after.id != before.id


def test_unstable_values_are_refused():
    with pytest.raises(TypeError, match="options.fn"):
        make_key(options={"fn": object()})
    with pytest.raises(TypeError, match="non-string key"):
        make_key(model_config={1: 2})
    with pytest.raises(ValueError, match="profile height"):
        make_key(profile={"height": [768, 512]})
    with pytest.raises(ValueError, match="accelerator"):
        make_key(accelerator=" ")
    with pytest.raises(TypeError, match="weights_fingerprint"):
        make_key(weights=torch.nn.Linear(2, 2))


def test_profile_covers():
    profile = {"batch": [1, 2], "height": [512, 768], "width": [512, 768]}
    assert profile_covers(profile, {"batch": 2, "height": 768, "width": 512}) == (True, "")
    assert profile_covers(profile, {"batch": [1, 2], "frames": 16}) == (True, "")  # unnamed dims are free
    ok, reason = profile_covers({"height": [512, 512]}, {"height": 768})
    assert not ok and reason == "profile height 512..512 does not cover 768"
    ok, reason = profile_covers(profile, {"batch": 4, "width": [512, 1024]})
    assert reason == "profile batch 1..2 does not cover 4; profile width 512..768 does not cover 512..1024"


def test_differences_read_as_old_to_new():
    old, new = make_key(), make_key(versions={**VERSIONS, "torch": "2.12"}, dtype="bfloat16",
                                    profile={"height": 768, "width": 768}, options={"mode": "default"})
    lines = describe_differences(old.fields, new.fields)
    assert "torch 2.11 → 2.12" in lines
    assert "dtype float16 → bfloat16" in lines
    assert "option mode max-autotune-no-cudagraphs → default" in lines
    assert "profile height 512..512 does not cover 768" in lines
    device = make_key(device={"type": "cuda", "name": "NVIDIA A100", "capability": "8.0"})
    assert describe_differences(old.fields, device.fields) == [
        "device NVIDIA H100 80GB HBM3 (9.0) → NVIDIA A100 (8.0)"]
    assert describe_differences(old.fields, old.fields) == []


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "/" + "a" * 63, "a" * 63, "a" * 65, "A" * 64,
                                 "..%2f" + "a" * 59, "", None, 12, "a" * 62 + "/.", "g" * 64])
def test_ids_that_are_not_hex_are_invalid(bad):
    with pytest.raises(InvalidArtifactId) as err:
        validate_id(bad)
    assert isinstance(err.value, ValueError) and err.value.status == 400
    assert validate_id("0123456789abcdef" * 4) == "0123456789abcdef" * 4


def test_cache_root_env_overrides_the_host_default(monkeypatch, tmp_path):
    host = tmp_path / "ComfyUI" / "models" / "accel_cache"
    monkeypatch.delenv("COMFY_ACCEL_CACHE", raising=False)
    assert resolve_cache_root(host_default=host) == host
    monkeypatch.setenv("COMFY_ACCEL_CACHE", "  ")  # blank: ignored
    assert resolve_cache_root(host_default=str(host)) == host
    monkeypatch.setenv("COMFY_ACCEL_CACHE", str(tmp_path / "shared"))
    assert resolve_cache_root(host_default=host) == tmp_path / "shared"
    assert resolve_cache_root() == tmp_path / "shared"


def test_cache_root_without_a_host_default(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFY_ACCEL_CACHE", raising=False)
    monkeypatch.setattr(environment, "PACK_ROOT", tmp_path / "ComfyUI" / "custom_nodes" / "comfy_accel")
    assert resolve_cache_root() == tmp_path / "ComfyUI" / "models" / "accel_cache"
    monkeypatch.setattr(environment, "PACK_ROOT", tmp_path / "webui" / "extensions" / "comfy_accel")
    assert resolve_cache_root() == tmp_path / "webui" / "models" / "accel_cache"
    monkeypatch.setattr(environment, "PACK_ROOT", tmp_path / "checkout")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_root() == Path(tmp_path / "xdg" / "comfy_accel" / "accel_cache")
