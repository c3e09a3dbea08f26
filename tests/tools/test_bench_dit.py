"""The DiT side-by-side (tools/bench_dit.py, `tools.bench --model <DiT>`, the DiT part of the CPU demo) runs on the
real sampler and says what it skipped; the full-size families it takes are the host's own configs."""
import json
import subprocess
import sys

import pytest
import torch

from tools.comfy_host import REPO_ROOT


def test_bench_dit_runs_eager_and_names_what_this_machine_cannot_run(pack, tmp_path, capsys):
    from tools import bench_dit

    out = tmp_path / "dit.json"
    assert bench_dit.main(["--model", "tiny-flux-dev", "--stacks", "eager,inductor+cudagraphs", "--steps", "2",
                           "--runs", "1", "--out", str(out)]) == 0
    rows = {row["stack"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["eager"]["median_s"] > 0 and rows["eager"]["speedup"] == 1.0
    if not torch.cuda.is_available():
        assert rows["inductor+cudagraphs"] == {"stack": "inductor+cudagraphs", "skipped": "CUDA graphs need a CUDA GPU"}
    assert bench_dit.main(["--model", "tiny-flux-dev", "--stacks", "eager,warp"]) == 2
    assert "unknown stack(s): warp" in capsys.readouterr().err


def test_the_full_size_flux_models_are_the_hosts_configs(comfy_path):
    """Built on the GPU only (12 B parameters): here their specs are checked against ComfyUI's own model configs."""
    import comfy.supported_models

    from tools.dit_factory import DIT_SPECS

    for name, config_class, guidance in (("flux-dev", "Flux", True), ("flux-schnell", "FluxSchnell", False)):
        spec = DIT_SPECS[name]
        config = getattr(comfy.supported_models, spec.config_class)(dict(spec.unet_config))
        assert spec.config_class == config_class and config.unet_config["guidance_embed"] is guidance
        assert (spec.unet_config["depth"], spec.unet_config["depth_single_blocks"]) == (19, 38)
        assert ("guidance" in spec.cond) is guidance


@pytest.mark.slow
def test_the_cpu_demo_shows_a_tiny_dit_after_the_tiny_unet(tmp_path):
    """What ./run_demo.sh adds on a CPU: after the UNet table, tiny Flux-dev eager and compiled block by block."""
    cmd = [sys.executable, "-m", "tools.bench", "--stacks", "eager", "--steps", "2", "--runs", "1", "--width", "64",
           "--height", "64", "--dit", "tiny-flux-dev", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| eager | " in proc.stdout
    result = json.loads(next(tmp_path.glob("bench-tiny-flux-dev-*.json")).read_text())
    rows = {row["stack"]: row for row in result["rows"]}
    assert set(rows) == {"eager", "inductor"} and rows["inductor"]["rel_err_vs_eager"] < 1e-4
    assert "compiles Flux block by block" in proc.stdout
