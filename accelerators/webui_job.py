"""One WebUI job of the extension: what its panel asked for (the plan, or the error of a bad value) and what ran.

Host-agnostic: the WebUI shim fills it while the job runs (the UNet runner's counts, the CFG cutoff step of each
sampling pass, whether TAESD was used, the notes of every choice made for the user) and turns it into the
infotext (`ran()` → `AccelPlan.infotext`) and the report of GET /comfy-accel/status.
"""
from __future__ import annotations

from . import events
from .webui_mapping import AccelPlan


class JobState:
    """What one job asked for and what ran."""

    def __init__(self, plan: AccelPlan | None = None, error: str = ""):
        self.plan, self.error = plan or AccelPlan(), error
        self.runner = None
        self.notes: list[str] = []
        self.cutoff_passes = []      # per sampling pass: the step the uncond skip starts at, or None
        self.taesd = False
        self.compiles_before = 0
        self.call_index = None       # the denoiser call of the current sampling pass (on_cfg_denoiser)

    def note(self, message: str) -> None:
        self.notes.append(message)
        events.notice("webui", message, level="info", once_key=f"webui:{message}")

    def ran(self) -> dict:
        counts = self.runner.counts if self.runner is not None else None
        compiled = bool(counts and counts.calls and counts.compiled == counts.calls)
        return {"backend": self.plan.backend if compiled else "eager",
                "deepcache": bool(counts and counts.shallow),
                "cfg_cutoff": bool(self.cutoff_passes) and all(s is not None for s in self.cutoff_passes),
                "taesd": self.taesd, "notes": list(self.notes)}

    def report(self) -> dict:
        out = {"plan": self.plan.as_metadata(), "error": self.error, "ran": self.ran(),
               "cutoff_steps": list(self.cutoff_passes)}
        if self.runner is not None:
            out["counts"] = self.runner.counts.as_dict()
            out["summary"] = self.runner.summary()
            session = self.runner.session
            if session is not None:
                out["compile_events"] = len(session.compiler.compile_events) - self.compiles_before
                out["compile_events_total"] = len(session.compiler.compile_events)
        return out
