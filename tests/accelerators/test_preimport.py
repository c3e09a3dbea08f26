"""The compiler's modules imported in the background at startup (accelerators/compile/preimport.py), each case in a
fresh interpreter: whether a module is imported is process state."""
import json
import os
import subprocess
import sys

import pytest

from tools.comfy_host import REPO_ROOT

pytestmark = pytest.mark.slow   # fresh interpreters importing torch

PRELUDE = """
import json, sys, time
from tools.comfy_host import import_comfy, import_pack
import_comfy()
import_pack()   # this machine has no CUDA: the pack's import starts nothing
from comfy_accel.accelerators.compile import preimport
out = {"after_pack_import": "torch._inductor.compile_fx" in sys.modules}
"""


def run(body: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body + "\nprint('RESULT ' + json.dumps(out))"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_the_thread_imports_the_compiler_and_the_session_waits_for_it(pack):
    out = run("""
from comfy_accel.accelerators import events
from comfy_accel.accelerators.compile.stand_in import session_of
from comfy_accel.accelerators.compile.inductor import apply
from tools.model_factory import build_model

model = build_model("tiny-sd15")
session = session_of(apply(model, {"fallback": "error"}))
thread = preimport.start_background_import(cuda=True)   # as on a CUDA machine
out["started"] = thread is not None and thread.name
out["again_same"] = preimport.start_background_import(cuda=True) is thread
session.compiled_module(model.model.diffusion_model)   # right away: the import takes over a second
out["alive_after_session_used_it"] = thread.is_alive()
out["imported"] = "torch._inductor.compile_fx" in sys.modules
out["summary"] = preimport.summary()
out["notices"] = [n["message"] for n in events.recent(20)]
out["wait_after"] = preimport.wait()
""")
    assert out["after_pack_import"] is False
    assert out["started"] == "comfy-accel-preimport" and out["again_same"]
    assert out["alive_after_session_used_it"] is False and out["imported"]
    assert out["summary"]["seconds"]["torch._inductor.compile_fx"] > 0 and out["summary"]["total"] > 0
    assert out["wait_after"] == 0.0
    waited = [n for n in out["notices"] if n.startswith("waited ")]
    # the session came to compile while the thread still imported, so it said how long it waited
    assert len(waited) == 1 and "compiler's modules" in waited[0], out["notices"]


def test_switched_off_or_without_cuda_nothing_is_imported_and_a_failing_module_is_skipped(pack):
    out = run("""
import os
from comfy_accel.accelerators import settings
out["reason_cpu"] = preimport.not_wanted_reason()
out["started_cpu"] = preimport.start_background_import() is not None
out["reason_off"] = preimport.not_wanted_reason(cuda=True)
out["started_off"] = preimport.start_background_import(cuda=True) is not None
out["wait"] = preimport.wait()
out["imported"] = "torch._inductor.compile_fx" in sys.modules
settings.update({"preimport": True})   # the saved setting: the process's variable still wins
out["reason_variable_wins"] = preimport.not_wanted_reason(cuda=True)
del os.environ["COMFY_ACCEL_PREIMPORT"]
settings.load(None)   # as a process started without the variable
out["reason_default"] = preimport.not_wanted_reason()
settings.update({"preimport": False})
out["reason_setting"] = preimport.not_wanted_reason(cuda=True)
# json was imported already, the other module does not exist: neither is timed, neither raises
out["seconds"] = preimport.import_compiler_modules(("no_such_module_here", "json"))
""", COMFY_ACCEL_PREIMPORT="off")
    assert out == {"after_pack_import": False, "reason_cpu": "COMFY_ACCEL_PREIMPORT=off", "started_cpu": False,
                   "reason_off": "COMFY_ACCEL_PREIMPORT=off", "started_off": False, "wait": 0.0,
                   "imported": False, "reason_variable_wins": "COMFY_ACCEL_PREIMPORT=off",
                   "reason_default": "no CUDA device", "reason_setting": "switched off in the settings",
                   "seconds": {}}
