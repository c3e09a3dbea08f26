"""The artifact cache shared by every accelerator and both hosts (ComfyUI, the WebUI).

    key = ArtifactKey.build(accelerator="inductor", options={...}, model_config={...},
                            weights=weights_fingerprint(module), profile={"batch": [1, 2], ...}, dtype="float16")
    entry, built = default_store().get_or_build(key, build_fn=lambda folder: ...)

Keys hash every field that makes an artifact valid and keep them readable, so a miss can be explained
(`store.explain_miss(key)` → ["torch 2.11 → 2.12"]). Writes are atomic, builds are locked per key across
processes, payloads are checksummed on load (corrupt ones quarantined), the disk is kept to a budget by
LRU eviction, and `LiveObjectCache` keeps loaded objects in memory under a byte budget.
Imports only the standard library at module level (torch, safetensors when used): no host code.
"""
from .api import api_clear, api_list, api_remove, api_stats, default_store
from .entry import CacheEntry, CacheResult, Lookup
from .environment import (ENV_CACHE_ROOT, current_device, describe_device, environment_fields, resolve_cache_root,
                          runtime_versions, set_host_version)
from .errors import ArtifactNotFound, CacheError, InvalidArtifactId, LockTimeout
from .keys import ArtifactKey, describe_differences, profile_covers, validate_id
from .live import LiveObjectCache
from .store import DEFAULT_BUDGET_BYTES, ArtifactStore


def weights_fingerprint(weights, full: bool = False, refresh: bool = False) -> str:
    """See fingerprint.weights_fingerprint (imported on first use: it needs torch)."""
    from .fingerprint import weights_fingerprint as compute

    return compute(weights, full=full, refresh=refresh)


def explain_miss(store: ArtifactStore, key: ArtifactKey) -> list[str]:
    """Why `key` misses in `store` (same as `store.explain_miss(key)`)."""
    return store.explain_miss(key)


__all__ = ["ArtifactKey", "ArtifactStore", "CacheEntry", "CacheResult", "Lookup", "LiveObjectCache",
           "weights_fingerprint", "environment_fields", "resolve_cache_root", "default_store", "explain_miss",
           "InvalidArtifactId", "ArtifactNotFound", "LockTimeout", "CacheError", "api_list", "api_remove",
           "api_clear", "api_stats", "profile_covers", "describe_differences", "validate_id", "set_host_version",
           "describe_device", "current_device", "runtime_versions", "ENV_CACHE_ROOT", "DEFAULT_BUDGET_BYTES"]
