"""Warm start: what a compile session keeps in the shared artifact cache so that a new process does not compile
again, both keyed on the architecture and shape bucket (not the weights: one entry serves every checkpoint).

- Compile-cache artifacts (`Compiler.save_artifacts` / `load_artifacts`, for inductor torch's portable FX-graph,
  AOTAutograd and autotuning caches): stored after the first compile of a bucket, loaded before the first
  compile in a new process. Kernels are not generated again, but dynamo still traces the Python.
- The precompiled UNet (`precompile.py`, inductor+cudagraphs' plain UNet calls where torch has dynamo's
  precompile): the whole forward compiled ahead of time, loaded by a new process with nothing to trace.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("comfy_accel")


def miss_reason(store, key, lookup) -> str:
    """Why the store had no entry for `key`: the key fields that differ from its nearest entry, or the reason."""
    reasons = store.explain_miss(key) if lookup.reason == "not cached" else [lookup.reason]
    return "; ".join(reasons) or lookup.reason


def exception_line(exc: Exception) -> str:
    """An exception as one short line for a notice: its type and the first line of its message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''}"


class Artifacts:
    """One compile session's warm-start artifacts: looked up, loaded, built and stored."""

    def __init__(self, session):   # a session.CompileSession: its compiler, options, model and notices
        self.session = session
        self.loaded_entries: set[str] = set()
        self.packages: dict[tuple, object] = {}   # bucket -> precompiled UNet (graph path)
        self.packages_from_cache: set[tuple] = set()   # buckets whose package was loaded, not built
        self.package_failed: str = ""

    @property
    def compiler(self):
        return self.session.compiler

    def store(self):
        session = self.session
        if session.get_store is None:
            return None
        try:
            return session.get_store()
        except Exception as exc:  # no cache folder (read-only disk, ...): compile without it
            session.notice(f"artifact cache unavailable ({exc}); compiling without warm restart", once="no-store")
            return None

    def _key(self, accelerator: str, bucket: tuple, options: dict, profile: dict | None):
        from ..cache import ArtifactKey
        from .session import unet_bucket

        dtype, device = unet_bucket(bucket)[5:7]
        return ArtifactKey.build(accelerator=accelerator, options={**self.compiler.artifact_options(), **options},
                                 model_config=self.session.model_config, profile=profile, dtype=dtype,
                                 device=device)

    def _meta(self, bucket: tuple, **more) -> dict:
        from .session import describe_bucket

        return {"family": self.session.model_config.get("family", "?"), "backend": self.session.name,
                "profile": describe_bucket(bucket), **more}

    # -- compile-cache artifacts -----------------------------------------------------------------------------
    def artifact_key(self, bucket: tuple):
        from .session import bucket_kind, bucket_profile

        accelerator = self.compiler.artifact_accelerator
        if accelerator is None:
            return None
        profile = {} if self.session.options.dynamic == "dynamic" else bucket_profile(bucket)
        return self._key(accelerator, bucket, {"part": bucket_kind(bucket)}, profile)

    def load_warm(self, bucket: tuple) -> bool:
        """Loads this bucket's artifacts from the store; True when they are in (now or by an earlier bucket)."""
        from .session import describe_bucket

        store = self.store()
        key = self.artifact_key(bucket) if store is not None else None
        if key is None:
            return False
        lookup = store.lookup(key)
        if lookup.entry is None:
            self.session.notice(f"cache miss for {describe_bucket(bucket)}: {miss_reason(store, key, lookup)}; "
                                f"compiling", level="info")
            return False
        if lookup.entry.id in self.loaded_entries:
            return True
        info = self.compiler.load_artifacts((lookup.entry.path / "compiled.bin").read_bytes())
        self.loaded_entries.add(lookup.entry.id)
        self.session.notice(f"warm start: compiled artifacts for {describe_bucket(bucket)} loaded from the cache "
                            f"(entry {lookup.entry.id[:12]}{', ' + info if info else ''})", level="info")
        return True

    def save_warm(self, bucket: tuple, seconds: float) -> None:
        store = self.store()
        key = self.artifact_key(bucket) if store is not None else None
        if key is None:
            return
        blob = self.compiler.save_artifacts()
        if not blob:
            return
        try:
            entry = store.put(key, {"compiled.bin": blob}, meta=self._meta(bucket, seconds=round(seconds, 1)))
            self.loaded_entries.add(entry.id)
        except Exception as exc:  # a full disk must not fail the image
            self.session.notice(f"could not store compiled artifacts: {exc}", once="store-failed")

    # -- the precompiled UNet (the whole UNet, graph path) ---------------------------------------------------------
    def uses_package(self, transformer_options: dict) -> bool:
        """Whether plain UNet calls run from a precompiled UNet: the backend builds them and no patch is set (it
        bakes the forward, patches included, into one signature)."""
        from .stand_in import patch_signature

        return (self.compiler.package_accelerator is not None and not self.package_failed
                and not patch_signature(transformer_options))

    def package_key(self, bucket: tuple):
        from .session import bucket_profile

        return self._key(self.compiler.package_accelerator, bucket,
                         {"part": "unet-package", "package_format": self.compiler.package_format},
                         bucket_profile(bucket))

    def package_stored(self, bucket: tuple) -> bool:
        """Whether the store holds this bucket's package (a manifest check, no hashing)."""
        if bucket in self.packages_from_cache:
            return True
        try:
            store = self.store()
            return store is not None and self.package_key(bucket) in store
        except Exception:   # an unreadable cache: the load itself reports it
            log.debug("package lookup for the progress line", exc_info=True)
            return False

    def package_for(self, unet, bucket: tuple, inputs: tuple, transformer_options: dict):
        """This bucket's package, bound to `unet`'s weights: from memory, from the store, or built now."""
        package = self.packages.get(bucket)
        if package is None:
            package = self._load_or_build(unet, bucket, inputs, transformer_options)
            self.packages[bucket] = package
        if package.needs_rebind(unet):
            package.bind(unet)
        return package

    def _load_or_build(self, unet, bucket, inputs, transformer_options):
        from .precompile import PackageUnusable
        from .session import describe_bucket

        store = self.store()
        if store is None:   # a package pays off only in a later process, through the cache: not worth a build
            raise PackageUnusable("no artifact cache to keep it in")
        key = self.package_key(bucket)
        lookup = store.lookup(key)
        kind = self.compiler.package_kind
        if lookup.entry is not None:
            started = time.monotonic()
            package = self.compiler.load_package(lookup.entry.path, unet, transformer_options)
            self.packages_from_cache.add(bucket)
            self.session.notice(f"warm start: {kind} for {describe_bucket(bucket)} loaded from the cache in "
                                f"{time.monotonic() - started:.1f} s (entry {lookup.entry.id[:12]}); nothing to "
                                f"trace or compile", level="info")
            return package
        self.session.notice(f"cache miss for the {kind} at {describe_bucket(bucket)}: "
                            f"{miss_reason(store, key, lookup)}; compiling", level="info")
        folder = Path(tempfile.mkdtemp(prefix="comfy_accel_package_"))
        try:
            package = self.compiler.build_package(unet, inputs, transformer_options, folder)
            try:
                store.put(key, self.compiler.package_files(folder), meta=self._meta(bucket, kind=kind))
            except Exception as exc:  # a full disk must not fail the image
                self.session.notice(f"could not store the compiled UNet package: {exc}", once="store-failed")
            return package
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def package_or_none(self, unet, bucket: tuple, inputs: tuple, options: dict):
        """The package the whole-UNet graph captures, or None where there is none (torch.compile then: the
        reason said once, never eager)."""
        if not self.uses_package(options):
            return None
        try:
            return self.package_for(unet, bucket, inputs, options)
        except Exception as exc:
            self.package_failed = exception_line(exc)
            log.debug("package failure", exc_info=True)
            self.session.notice(f"no ahead-of-time package for the UNet ({self.package_failed}); using "
                                f"torch.compile (a new process will trace the UNet again)", once="package-failed")
            return None

    def drop_package(self, bucket: tuple, call, exc: Exception) -> bool:
        """The package `call` failed in this process (its graph capture): packages are off for this session
        and the bucket uses torch.compile. False when `call` was not a package."""
        if call is not self.packages.get(bucket):
            return False
        self.packages.pop(bucket, None)
        self.package_failed = exception_line(exc)
        log.debug("package failure", exc_info=True)
        self.session.notice(f"the ahead-of-time UNet package failed here ({self.package_failed}); using "
                            f"torch.compile", once="package-failed")
        return True
