"""Exceptions of the artifact cache, typed so that HTTP routes can map them to status codes."""
from __future__ import annotations


class CacheError(Exception):
    """Base class; `status` is the HTTP status a route should answer with."""

    status = 500

    def as_dict(self) -> dict:
        return {"error": str(self), "status": self.status}


class InvalidArtifactId(CacheError, ValueError):
    """An id that is not a cache id (wrong length, not hex, a path such as `../x` or `/etc`)."""

    status = 400


class ArtifactNotFound(CacheError, LookupError):
    """A well-formed id with no entry in the store."""

    status = 404


class LockTimeout(CacheError, TimeoutError):
    """Another process held a key's build lock longer than the caller was willing to wait."""

    status = 409
