"""accelerators/webui_runners.py (the runner a WebUI job's plan gets, kept across jobs) and JobState.runner_for, on
the CPU with ComfyUI's real tiny SD1.5 UNet (the ldm block layout of the WebUI's; test_webui_unet.py says why)."""
import pytest
import torch

from accelerators import settings as core_settings
from accelerators.base import Availability, BackendUnavailable
from accelerators.webui_job import JobState
from accelerators.webui_mapping import panel_to_plan
from accelerators.webui_runners import RunnerCache, apply_layer_weights, runner_key
from accelerators.webui_unet import WebUIUNetRunner


def plan(**values):
    return panel_to_plan({"enabled": True, "backend": "eager", **values}, settings=core_settings.Settings(),
                         availability=lambda name: Availability(True, "here"), gpu=Availability(True, "gpu"))


@pytest.fixture(scope="module")
def host(tiny_sd15):
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    def host_forward(module, x, timesteps, context, *y):
        return type(module).forward(module, x, timesteps, context, *y)

    unet = tiny_sd15.model.diffusion_model.eval()
    return {"unet": unet, "host_forward": host_forward, "timestep_embedding": timestep_embedding, "cat": torch.cat,
            "family": "sd1", "get_store": lambda: None}


def test_a_plan_gets_its_runner_and_the_same_plan_reuses_it(host):
    cache = RunnerCache()
    deep = cache.runner_for(plan(deepcache=True, deepcache_interval=4), **host)
    assert isinstance(deep, WebUIUNetRunner) and deep.unet is host["unet"] and deep.session is None
    assert runner_key(plan(deepcache=True, deepcache_interval=4)) == ("eager", (4, 0), ())
    assert cache.runner_for(plan(deepcache=True, deepcache_interval=4), **host) is deep
    plain = cache.runner_for(plan(step_cache=True), **host)
    assert plain is not deep and list(cache.runners.values()) == [plain]   # one model, one runner at a time
    x, t, c = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.randn(2, 77, 64)
    plain.begin_call(0)
    assert torch.equal(plain(x, t, c), host["host_forward"](host["unet"], x, t, c))


def test_a_backend_that_cannot_serve_the_webui_unet_runs_eager_or_fails_by_policy(host):
    asked = plan(backend="onediff")
    assert asked.backend == "onediff" and runner_key(asked)[2] == (("dynamic", "buckets"), ("fallback", "eager"),
                                                                   ("precision", "auto"))
    runner = RunnerCache().runner_for(asked, **host)
    assert runner.session is None and "onediff" in runner.notes[0] and runner.notes[0].endswith("; running eager")
    with pytest.raises(BackendUnavailable, match="onediff"):
        RunnerCache().runner_for(plan(backend="onediff", fallback="error"), **host)


def test_the_job_keeps_its_runner_and_its_error(host):
    made = []

    def make(job_plan, unet):
        made.append(unet)
        return RunnerCache().runner_for(job_plan, unet, **{k: v for k, v in host.items() if k != "unet"})

    job = JobState(plan(deepcache=True))
    runner = job.runner_for(host["unet"], make)
    assert job.runner_for(host["unet"], make) is runner and made == [host["unet"]]
    assert job.compiles_before == 0 and runner.counts.calls == 0

    failing = JobState(plan(backend="onediff", fallback="error"))
    for _ in range(2):   # the error stays the job's: every later call fails with it, nothing is made again
        with pytest.raises(RuntimeError, match="^comfy-accel: .*onediff"):
            failing.runner_for(host["unet"], make)
    assert "onediff" in failing.error and failing.report()["error"] == failing.error and len(made) == 2


def test_layer_weights_are_applied_to_every_layer_kind_a_lora_patches(host):
    seen = []
    apply_layer_weights(host["unet"], lambda module: seen.append(type(module).__name__))
    assert {"Conv2d", "Linear", "GroupNorm", "LayerNorm"} <= set(seen)
    assert len(seen) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm,
                                          torch.nn.MultiheadAttention)) for m in host["unet"].modules())
