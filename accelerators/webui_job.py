"""One WebUI job of the extension: what its panel asked for (the plan, or the error of a bad value) and what ran.

Host-agnostic: the WebUI shim fills it while the job runs (the UNet runner's counts, the CFG cutoff step of each
sampling pass, whether TAESD was used, the notes of every choice made for the user) and turns it into the
infotext (`ran()` → `AccelPlan.infotext`) and the report of GET /comfy-accel/status.
"""
from __future__ import annotations

import time

from typing import Callable

from . import events
from .base import AcceleratorInputError, BackendUnavailable
from .webui_mapping import AccelPlan


class JobState:
    """What one job asked for and what ran."""

    def __init__(self, plan: AccelPlan | None = None, error: str = ""):
        self.plan, self.error = plan or AccelPlan(), error
        self.runner = None
        self.notes: list[str] = []
        self.cutoff_passes = []      # per sampling pass: the step the uncond skip starts at, or None
        self.taesd = False
        self.step_cache = None       # webui_step_cache.UNetStepCache when the plan has one
        self.compiles_before = 0
        self.fp8_calls_before = 0    # the session's fp8 calls when this job started (webui_unet, precision fp8)
        self.call_index = None       # the denoiser call of the current sampling pass (on_cfg_denoiser)
        self.started = time.time()

    def note(self, message: str) -> None:
        self.notes.append(message)
        events.notice("webui", message, level="info", once_key=f"webui:{message}")

    def runner_for(self, unet, make_runner: Callable):
        """This job's UNet runner for `unet`, made by `make_runner(plan, unet)` on the job's first call (and after a
        model switch), its counts starting from this job. The job's error (a bad value, a backend unavailable under
        fallback `error`) is raised as RuntimeError: from the SdUnet, where A1111 does not swallow it."""
        if not self.error and (self.runner is None or self.runner.unet is not unet):
            try:
                self.runner = make_runner(self.plan, unet)
            except (BackendUnavailable, AcceleratorInputError) as exc:
                self.error = str(exc)
                raise RuntimeError(f"comfy-accel: {exc}") from None
            self.runner.reset_counts()
            session = self.runner.session
            self.compiles_before = len(session.compiler.compile_events) if session else 0
            self.fp8_calls_before = self.fp8_calls()
        if self.error:
            raise RuntimeError(f"comfy-accel: {self.error}")
        return self.runner

    def ran(self) -> dict:
        counts = self.runner.counts if self.runner is not None else None
        compiled = bool(counts and counts.calls and counts.compiled == counts.calls)
        return {"backend": self.plan.backend if compiled else "eager",
                "deepcache": bool(counts and counts.shallow),
                "cfg_cutoff": bool(self.cutoff_passes) and all(s is not None for s in self.cutoff_passes),
                "taesd": self.taesd, "step_cache": self.step_cache_ran(),
                "notes": [*self.notes, *self.warnings(), *(self.step_cache.notes if self.step_cache else [])],
                "precision": "fp8" if compiled and self.fp8_calls() > self.fp8_calls_before else "auto"}

    def fp8_calls(self) -> int:
        fp8 = getattr(getattr(self.runner, "session", None), "fp8", None)
        return fp8.calls if fp8 is not None else 0

    def step_cache_ran(self) -> str | None:
        """"skipped N of M steps" where the step cache saw this job's UNet calls, else None."""
        run = self.step_cache.summary() if self.step_cache is not None else None
        return f"skipped {run['skipped_steps']} of {run['steps']} {run['unit']}" if run and run["steps"] else None

    def warnings(self) -> list[str]:
        """The pack's warnings during this job (a compile that failed and ran eager, ...), and the runner's own."""
        found = list(getattr(self.runner, "notes", []))
        session = getattr(self.runner, "session", None)
        if session is not None and self.runner.counts.eager:   # a shape whose compile failed runs eager: say why
            found += [f"{session.name}: {state.failed}" for state in session.buckets.values() if state.failed]
        found += [f"{n['accelerator']}: {n['message']}" for n in events.recent(50)
                  if n["time"] >= self.started and n["level"] != "info" and n["accelerator"] != "webui"]
        return found

    def report(self) -> dict:
        out = {"plan": self.plan.as_metadata(), "error": self.error, "ran": self.ran(),
               "cutoff_steps": list(self.cutoff_passes)}
        if self.step_cache is not None:
            out["step_cache"] = self.step_cache.summary()
        if self.runner is not None:
            out["counts"] = self.runner.counts.as_dict()
            out["summary"] = self.runner.summary()
            session = self.runner.session
            if session is not None:
                out["compile_events"] = len(session.compiler.compile_events) - self.compiles_before
                out["compile_events_total"] = len(session.compiler.compile_events)
        return out


def restorable_override(opts_data: dict, overrides: dict, key: str, value, current) -> None:
    """Sets a per-job settings override that A1111 puts back after the job, also on a fresh install.

    A1111 saves the values to restore only for keys already in `opts.data` (processing.py: `stored_opts`); a key
    a fresh install never saved is missing there, and its override would outlive the job. So the key is first put
    into `opts_data` with its `current` value (what the WebUI uses now: its default on a fresh install).
    """
    if key not in opts_data:
        opts_data[key] = current
    overrides[key] = value
