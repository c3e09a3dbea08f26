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


def test_the_step_cache_stacks_run_here_and_say_what_they_skipped(pack, tmp_path):
    """The step-cache rows on tiny Flux-dev (CPU, 4 steps): the forced schedule skips steps 1 and 3, core's
    EasyCache and our adaptive rule on random weights skip nothing (the row says so); each row has its latent's
    relative error and PSNR against eager; the CUDA-graph stacks name what they need."""
    from tools import bench_dit

    out = tmp_path / "dit.json"
    stacks = "eager,step-cache-2,step-cache-adaptive,comfy-easycache,inductor+cudagraphs+step-cache-2"
    assert bench_dit.main(["--model", "tiny-flux-dev", "--stacks", stacks, "--steps", "4", "--runs", "1",
                           "--out", str(out)]) == 0
    rows = {row["stack"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["step-cache-2"]["step_cache"].startswith("skipped 2 of 4 steps (interval, interval 2")
    assert 0 < rows["step-cache-2"]["rel_err_vs_eager"] < 1 and rows["step-cache-2"]["latent_psnr_db"] > 0
    assert rows["step-cache-adaptive"]["step_cache"].startswith("skipped 0 of 4 steps (adaptive, threshold 0.2")
    assert rows["step-cache-adaptive"]["latent_psnr_db"] == "inf"   # nothing skipped: eager's latent exactly
    easycache = rows["comfy-easycache"]
    assert "skipped 0/4" in easycache["easycache"] and "skipped nothing" in easycache["note"]
    if not torch.cuda.is_available():
        assert rows["inductor+cudagraphs+step-cache-2"]["skipped"] == "CUDA graphs need a CUDA GPU"


@pytest.mark.slow   # inductor compiles tiny Flux's two block classes on this CPU (~1 min)
def test_the_compiled_step_cache_stacks_run_here(pack, tmp_path):
    from tools import bench_dit

    out = tmp_path / "dit.json"
    assert bench_dit.main(["--model", "tiny-flux-dev", "--stacks", "eager,step-cache-2,inductor+step-cache-2,"
                           "comfy-compile+easycache", "--steps", "4", "--runs", "1", "--out", str(out)]) == 0
    rows = {row["stack"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["inductor+step-cache-2"]["step_cache"].startswith("skipped 2 of 4 steps")
    assert rows["inductor+step-cache-2"]["rel_err_vs_eager"] == pytest.approx(rows["step-cache-2"]["rel_err_vs_eager"],
                                                                                abs=1e-4)
    assert "skipped 0/4" in rows["comfy-compile+easycache"]["easycache"]


def test_checkpoint_loads_a_diffusion_model_file_of_the_family(pack, tmp_path):
    """--checkpoint: a diffusion-model file (here tiny Flux-dev's weights saved as safetensors) loaded into the named
    family's model; the same weights give the same latent; a file of another layout is refused naming the keys."""
    import comfy.utils
    from tools import bench_dit
    from tools.dit_factory import build_dit, sample_dit

    model = build_dit("tiny-flux-dev", seed=9)
    path = tmp_path / "tiny_flux.safetensors"
    comfy.utils.save_torch_file(model.model.diffusion_model.state_dict(), str(path))
    loaded = bench_dit.load_dit_checkpoint(str(path), "tiny-flux-dev", torch.float32)
    assert torch.equal(sample_dit(loaded, steps=2), sample_dit(model, steps=2))
    with pytest.raises(SystemExit, match="not a tiny-wan21 diffusion model"):
        bench_dit.load_dit_checkpoint(str(path), "tiny-wan21", torch.float32)
    out = tmp_path / "dit.json"
    assert bench_dit.main(["--model", "tiny-flux-dev", "--checkpoint", str(path), "--stacks", "eager,step-cache-2",
                           "--steps", "4", "--runs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["env"]["weights"] == str(path) and result["rows"][1]["step_cache"].startswith("skipped 2 of 4")
