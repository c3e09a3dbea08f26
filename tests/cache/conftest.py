"""Fixtures of the artifact-cache tests: a store in a temporary folder (real files, no mocks)."""
from __future__ import annotations

import pytest

from tests.cache.cache_helpers import make_key
from accelerators.cache import ArtifactStore


@pytest.fixture
def key_factory():
    return make_key


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "accel_cache", budget_bytes=10**9)
