"""The compiler's Python modules, imported in a background thread while ComfyUI starts.

A warm restart loads a stored compiled UNet instead of compiling it, and that load needs inductor and
AOTAutograd: importing `torch._inductor.compile_fx` pulls in hundreds of modules, seconds of work where
Python has no bytecode for them. Started when the node pack is imported on a CUDA machine, the import is done
by the time the first prompt samples, and the first warm sample no longer waits for it (docs/benchmarks.md).

The compile lane calls `wait()` before it compiles or loads anything: while the thread is importing, another
thread importing the same modules could see a partly initialised module (CPython accepts that for circular
imports across threads), so nothing of ours touches the compiler until the thread is done.
The `preimport` setting turns it off (or COMFY_ACCEL_PREIMPORT=0 for one process).
"""
from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("comfy_accel")

# the load path of a stored compiled UNet (dynamo's precompile, compile-cache artifacts): inductor's
# compile_fx imports AOTAutograd, the partitioner and inductor's codegen
MODULES = ("torch._inductor.compile_fx",)
GPU_MODULES = ("triton",)   # inductor's GPU kernels are triton's

_lock = threading.Lock()
_thread: threading.Thread | None = None
_result: dict = {}


def import_compiler_modules(modules: tuple[str, ...]) -> dict[str, float]:
    """Imports `modules` (those not imported yet) and returns the seconds each took; one that fails to import
    is logged and skipped (the compile lane reports its own availability)."""
    import importlib

    seconds = {}
    for name in modules:
        if name in sys.modules:
            continue
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:   # e.g. no triton on this machine: the lane says so when it is used
            log.debug("[comfy-accel] background import of %s failed: %s", name, exc)
            continue
        seconds[name] = time.perf_counter() - started
    return seconds


def not_wanted_reason(cuda: bool | None = None) -> str:
    """Why the background import is not started here, or "" when it should be."""
    from .. import settings

    if not settings.get_settings().preimport:
        return settings.overridden_by("preimport") or "switched off in the settings"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:   # where the compile lane's graphs run: a CPU user rarely compiles, so the import is not paid
        return "no CUDA device"
    return ""


def start_background_import(cuda: bool | None = None) -> threading.Thread | None:
    """Starts the import thread once per process (a daemon: it never holds up an exit); None where it is not
    wanted (see `not_wanted_reason`) or all modules are already imported."""
    global _thread
    reason = not_wanted_reason(cuda)
    if reason:
        log.debug("[comfy-accel] compiler modules not imported in the background: %s", reason)
        return None
    modules = MODULES + GPU_MODULES
    if all(name in sys.modules for name in modules):
        return None
    with _lock:
        if _thread is None:
            def run():
                started = time.perf_counter()
                _result["seconds"] = import_compiler_modules(modules)
                _result["total"] = time.perf_counter() - started

            _thread = threading.Thread(target=run, name="comfy-accel-preimport", daemon=True)
            _thread.start()
        return _thread


def wait(timeout: float | None = 120.0) -> float:
    """Blocks until the background import (if one was started) is done; returns the seconds waited."""
    thread = _thread
    if thread is None or not thread.is_alive():
        return 0.0
    started = time.perf_counter()
    thread.join(timeout)
    return time.perf_counter() - started


def summary() -> dict:
    """What the background import did: per-module seconds and the total (empty before it finished)."""
    return dict(_result)
