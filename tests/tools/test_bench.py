"""The main job runs end to end on the CPU and writes its table, JSON and chart."""
import json
import subprocess
import sys

import pytest

from tests.accelerators.test_compile_dit import graph_lane   # before ComfyUI's own `tests` package is on the path
from tools.comfy_host import REPO_ROOT


@pytest.mark.slow
def test_bench_runs_side_by_side_and_writes_results(tmp_path):
    cmd = [sys.executable, "-m", "tools.bench", "--stacks", "eager,cfg-cutoff-50,step-cache-2", "--steps", "4", "--runs", "2",
           "--width", "64", "--height", "64", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| eager | " in proc.stdout and "| cfg-cutoff-50 (lossy) | " in proc.stdout
    result = json.loads(next(tmp_path.glob("bench-tiny-sd15-*.json")).read_text())
    rows = {row["stack"]: row for row in result["rows"]}
    assert rows["eager"]["fidelity"]["rel_err"] == 0.0
    assert len(rows["eager"]["times_s"]) == 2
    # the cutoff drops the uncond pass on 2 of 4 steps: a real but bounded change
    assert 1e-4 < rows["cfg-cutoff-50"]["fidelity"]["rel_err"] < 0.5
    assert list(tmp_path.glob("bench-tiny-sd15-*.png"))
    # the forced schedule skips steps 1 and 3 (window up to 95%), and the row and the table say so
    assert rows["step-cache-2"]["step_cache"].startswith("skipped 2 of 4 steps (interval, interval 2")
    assert "(skipped 2 of 4 steps" in proc.stdout and 1e-4 < rows["step-cache-2"]["fidelity"]["rel_err"] < 1.0


@pytest.mark.slow
def test_bench_rejects_unknown_stacks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "--stacks", "eager,warp", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown stack(s): warp" in proc.stderr


def test_steps_sweep_fit_splits_per_step_and_fixed_cost():
    from tools.bench import fit_steps

    per_step, fixed = fit_steps({10: 0.010 + 10 * 0.007, 20: 0.010 + 20 * 0.007, 40: 0.010 + 40 * 0.007})
    assert abs(per_step - 0.007) < 1e-12 and abs(fixed - 0.010) < 1e-12
    # a run whose time does not grow linearly with the steps gives a negative fixed cost: the bench says so
    assert fit_steps({10: 0.33, 20: 0.68, 40: 1.92})[1] < 0


@pytest.mark.slow
def test_bench_dit_step_cache_stacks_say_what_they_skipped(tmp_path):
    """The DiT bench's step-cache stacks: our forced schedule skips 9 of 20 steps; core's EasyCache beside it says
    what it skipped (its log line); both differ from eager by a bounded amount."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "tools.bench_dit", "--model", "tiny-wan21", "--stacks",
           "eager,step-cache-2,comfy-easycache", "--steps", "20", "--runs", "1", "--easycache-threshold", "0.5",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {row["stack"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["step-cache-2"]["step_cache"].startswith("skipped 9 of 20 steps")
    assert rows["comfy-easycache"]["easycache"].startswith("EasyCache - skipped")
    assert 0 < rows["step-cache-2"]["rel_err_vs_eager"] < 0.5


def test_the_gpu_step_cache_stacks_compose_on_the_cpu_graph_lane(pack, tiny_sd15, monkeypatch):
    """The GPU-only step-cache stacks of the UNet bench, built by their own builders on the tiny SD1.5 with
    inductor+cudagraphs swapped for the CPU graph lane (the real capture path without CUDA, aot_eager for
    inductor): every full call replays a graph, none runs compiled-only or eager, and the step cache skipped."""
    from comfy_accel.accelerators import registry
    from comfy_accel.accelerators.step_cache import step_cache_state
    from tools import bench
    from tools.model_factory import sample

    real_get, sessions = registry.get, []

    class CpuGraphLane:
        def apply(self, model, options):
            accelerated, session = graph_lane(model, "bench-step-cache")
            sessions.append(session)
            return accelerated

    monkeypatch.setattr(registry, "get", lambda name: CpuGraphLane() if name == "inductor+cudagraphs"
                        else real_get(name))
    stacks = [s for s in bench.STACKS if "step-cache" in s.name and s.gpu_only]
    assert {s.name for s in stacks} == {"compile+step-cache-2", "compile+step-cache-2+cutoff-50",
                                        "fastest-step-cache+taesd"}
    for stack in stacks:
        model = stack.build(tiny_sd15, {"store": None})
        sample(model, steps=6)
        session = sessions[-1]
        # with CFG cutoff at 50% the first batch-1 call (step 3) has no entry of its own and runs: 1, 5 skipped
        skipped = 2 if "cutoff" in stack.name or "fastest" in stack.name else 3
        assert step_cache_state(model).last_run["line"].startswith(f"skipped {skipped} of 6 steps (interval, interv")
        assert session.calls["graph"] > 0 and session.calls["compiled"] == session.calls["eager"] == 0, stack.name


def test_the_demo_takes_short_dit_names():
    """`./run_demo.sh --model flux` (the README's line) names the full-size FLUX.1-dev; unknown names stay as given."""
    from tools.bench import parse_args

    assert parse_args(["--model", "flux"]).model == "flux-dev"
    assert parse_args(["--model", "wan"]).model == "wan21-1.3b"
    assert parse_args(["--model", "sdxl"]).model == "sdxl"
