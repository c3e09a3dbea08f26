"""The extension inside a real AUTOMATIC1111 WebUI (WEBUI_PATH), driven over its API by tools/webui_host.py.

Skipped where WEBUI_PATH is unset (CI): the WebUI is on no package registry. Each check reads what happened from
the WebUI itself: the probe extension's per-call UNet batch and middle-block runs, the infotext, the options
before and after, the WebUI's log, and comfy-accel's /comfy-accel/status. All slow: one WebUI start is ~30 s.
"""
import json
import os
from pathlib import Path

import numpy
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]   # not from tests.conftest: ComfyUI has a `tests` package too
from tools.webui_host import WebUIHost, webui_path

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(webui_path() is None, reason="WEBUI_PATH is not set: these tests need an "
                                 "AUTOMATIC1111 checkout with its repositories and venv (not on any package "
                                 "registry; docs/webui.md says how to make one)")]
DATA = Path(os.environ.get("WEBUI_DATA") or REPO_ROOT / "test_artifacts" / "webui")
CUTOFF_50 = {"backend": "eager", "cfg_cutoff": True, "cfg_cutoff_percent": 50}


@pytest.fixture(scope="module")
def webui():
    host = WebUIHost(webui_path(), DATA, port=int(os.environ.get("WEBUI_PORT", 7861)))   # another session's WebUI
    host.write_config({})   # a fresh install: no config.json
    for name in ("taesd_decoder.pth", "taesd_encoder.pth"):
        (DATA / "models" / "VAE-taesd" / name).unlink(missing_ok=True)
    host.start()
    yield host
    host.stop()


def infotext_fields(job) -> dict:
    from accelerators.webui_mapping import INFOTEXT_PREFIX

    last = job.infotext.splitlines()[-1]
    return {k.strip(): v.strip().strip('"') for k, v in (part.split(":", 1) for part in _split(last))
            if k.strip().startswith(INFOTEXT_PREFIX)}


def _split(line: str):
    """Infotext "k: v, k: "v, w"" → parts (quoted values keep their commas)."""
    parts, current, quoted = [], "", False
    for char in line:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in (*parts, current) if ":" in p]


def test_settings_section_and_panel_are_there(webui):
    options = webui.get("/sdapi/v1/options")
    assert {"accel_cache_folder", "accel_default_backend", "accel_fallback_policy", "accel_precompile",
            "accel_channels_last"} <= set(options)
    webui.post("/sdapi/v1/options", {"accel_channels_last": False})   # a switch reaches the core settings
    assert webui.get("/comfy-accel/status")["settings"]["channels_last"] is False
    webui.post("/sdapi/v1/options", {"accel_channels_last": True})
    names = webui.get("/sdapi/v1/scripts")
    assert "comfy-accel" in names["txt2img"] and "comfy-accel" in names["img2img"]


def test_cfg_cutoff_in_txt2img_and_both_hires_passes(webui):
    job = webui.job(accel=CUTOFF_50)
    assert job.ok, job.error
    assert job.batches == [2, 2, 2, 1, 1, 1]
    assert infotext_fields(job)["Accel CFG cutoff"] == "50%"
    hires = webui.job(accel=CUTOFF_50, enable_hr=True, hr_scale=2, hr_second_pass_steps=4, denoising_strength=0.5,
                      hr_upscaler="Latent")
    assert hires.ok, hires.error
    assert hires.batches == [2, 2, 2, 1, 1, 1] + [2, 2, 1, 1]
    assert hires.accel["cutoff_steps"] == [3, 2]


@pytest.mark.parametrize("fix_steps, expected", [(False, [2, 2, 1, 1]), (True, [2, 2, 2, 1, 1, 1])])
def test_cfg_cutoff_in_img2img(webui, fix_steps, expected):
    source = webui.job()
    job = webui.job("img2img", accel=CUTOFF_50, init_images=[source.response["images"][0]], denoising_strength=0.5,
                    override_settings={"img2img_fix_steps": fix_steps})
    assert job.ok, job.error
    assert job.batches == expected   # 6 steps at 0.5: 4 sampled (3 + 1), or exactly 6 with img2img_fix_steps


def test_deepcache_runs_the_deep_blocks_on_one_call_in_three(webui):
    webui.post("/accel-probe/config", {"deep_hook": True})
    try:
        job = webui.job(accel={"backend": "eager", "deepcache": True, "deepcache_interval": 3})
    finally:
        webui.post("/accel-probe/config", {"deep_hook": False})
    assert job.ok, job.error
    assert [c["deep"] for c in job.calls] == [True, False, False, True, False, False]
    assert job.accel["counts"]["full"] == 2 and job.accel["counts"]["shallow"] == 4
    fields = infotext_fields(job)
    assert fields["Accel DeepCache"] == "interval 3, branch 0" and fields["Accel backend"] == "eager"


def test_step_cache_runs_the_unet_on_the_scheduled_calls_and_the_next_job_is_plain(webui):
    """Step Cache interval 3 over 6 steps (window from 15%: step 1 on): the UNet's middle block runs on calls 0,
    1 and 4 only, the infotext says so; the next job without the extension and one with CFG cutoff alone run
    every call. Heun calls the UNet 11 times for 6 steps: interval 2 counts calls, and the infotext says so. The
    panel's window and most-in-a-row reach the job: from step 0 until half the steps, at most 1 skip in a row, the
    UNet skips call 1 only."""
    webui.post("/accel-probe/config", {"deep_hook": True})
    try:
        job = webui.job(accel={"backend": "eager", "step_cache": True, "step_cache_mode": "interval",
                               "step_cache_interval": 3})
        plain = webui.job()
        cutoff = webui.job(accel=CUTOFF_50)
        heun = webui.job(accel={"backend": "eager", "step_cache": True, "step_cache_mode": "interval",
                                "step_cache_interval": 2}, sampler_name="Heun")
        window = webui.job(accel={"backend": "eager", "step_cache": True, "step_cache_mode": "interval",
                                  "step_cache_interval": 3, "step_cache_start": 0.0, "step_cache_end": 0.5,
                                  "step_cache_max_consecutive": 1})
    finally:
        webui.post("/accel-probe/config", {"deep_hook": False})
    assert job.ok, job.error
    assert [c["deep"] for c in job.calls] == [True, True, False, False, True, False]
    assert job.accel["step_cache"]["skipped_steps"] == 3 and job.accel["counts"]["calls"] == 3
    assert infotext_fields(job)["Accel Step Cache"] == ("interval, interval 3, steps 0.15-0.95, max 3 in a row, "
                                                       "skipped 3 of 6 steps")
    assert plain.ok and [c["deep"] for c in plain.calls] == [True] * 6 and not infotext_fields(plain)
    assert cutoff.ok and [c["deep"] for c in cutoff.calls] == [True] * 6
    assert "Accel Step Cache" not in infotext_fields(cutoff) and "step_cache" not in cutoff.accel
    assert heun.ok and [c["deep"] for c in heun.calls] == [True, True, True, False, True, False, True, False, True,
                                                           False, True]
    assert infotext_fields(heun)["Accel Step Cache"] == ("interval, interval 2, steps 0.15-0.95, max 3 in a row, "
                                                        "skipped 4 of 11 UNet calls")
    assert window.ok, window.error
    assert [c["deep"] for c in window.calls] == [True, False, True, True, True, True]
    assert infotext_fields(window)["Accel Step Cache"] == ("interval, interval 3, steps 0-0.5, max 1 in a row, "
                                                          "skipped 1 of 6 steps")


def test_step_cache_adaptive_decides_every_call_of_ddim_plms_and_heun(webui):
    """adaptive has a sigma for every UNet call where the calls are not the schedule's steps: DDIM and PLMS (no sigma
    schedule: the sampler's own timesteps, host floats) and Heun (two calls a step: each call's timestep, one read).
    Random weights change too much per step to skip, so what is checked is what the decision had, and that the
    summary and infotext count what ran (the middle block's runs, seen by the probe)."""
    webui.post("/accel-probe/config", {"deep_hook": True})
    try:
        jobs = {sampler: webui.job(accel={"backend": "eager", "step_cache": True, "step_cache_mode": "adaptive"},
                                   sampler_name=sampler) for sampler in ("DDIM", "PLMS", "Heun")}
    finally:
        webui.post("/accel-probe/config", {"deep_hook": False})
    from accelerators.webui_passes import compvis_call_timesteps

    ddim_timesteps = [float(min(t + 1, 999)) for t in range(0, 1000, 1000 // 6)]   # A1111's get_timesteps, 6 steps
    for sampler, calls, source in (("DDIM", 6, "timesteps"), ("PLMS", 7, "timesteps"), ("Heun", 11, "read")):
        job = jobs[sampler]
        assert job.ok, job.error
        if source == "timesteps":   # the host's timestep of each call is the one the sampler gave the UNet
            assert [c["t"] for c in job.calls] == compvis_call_timesteps(ddim_timesteps, sampler.lower())
        run = job.accel["step_cache"]
        assert len(job.calls) == run["calls"] == calls == run["decided"] == run["sigma_sources"][source], sampler
        ran = sum(bool(c["deep"]) for c in job.calls)
        assert run["ran"] == ran and run["skipped_steps"] == calls - ran
        fields = infotext_fields(job)
        assert "skipped nothing" not in fields.get("Accel note", "") and "skipped nothing" not in str(job.accel)
        assert fields["Accel Step Cache"] == ("adaptive, threshold 0.2, steps 0.15-0.95, max 3 in a row, "
                                              f"skipped {calls - ran} of {calls} UNet calls")


@pytest.mark.parametrize("accel, message", [
    ({"backend": "bogus"}, "unknown backend 'bogus'"),
    ({"cfg_cutoff": True, "cfg_cutoff_percent": 150}, "cfg_cutoff_percent must be between 0 and 100, got 150"),
    ({"deepcache": "maybe"}, "deepcache must be on or off"),
    ({"cfg_cutoff": True, "cfg_cutoff_percent": "abc"}, "cfg_cutoff_percent"),
    ({"backend": "tensorrt", "deepcache": True}, "tensorrt"),   # with the fallback policy "error"
])
def test_a_bad_value_fails_the_job_with_its_message(webui, accel, message):
    policy = "error" if accel.get("backend") == "tensorrt" else "eager"
    webui.post("/sdapi/v1/options", {"accel_fallback_policy": policy})
    try:
        job = webui.job(accel=accel)
    finally:
        webui.post("/sdapi/v1/options", {"accel_fallback_policy": "eager"})
    assert job.status == 500 and message in job.error and "comfy-accel" in job.error
    assert len(job.calls) == 1   # the first UNet call raised: nothing was sampled


def test_tensorrt_missing_runs_eager_and_the_infotext_says_so(webui):
    """No tensorrt here: under fallback `eager` the job runs the WebUI's eager UNet and its infotext says that eager
    ran, that tensorrt was asked for, and what installs it (under `error` the job fails: see the test above)."""
    from accelerators.tensorrt import available

    if available():
        pytest.skip("TensorRT is available here: the fallback is not what runs")
    baseline = webui.job()
    job = webui.job(accel={"backend": "tensorrt"})
    assert job.ok, job.error
    fields = infotext_fields(job)
    assert fields["Accel backend"] == "eager" and fields["Accel requested"] == "tensorrt"
    assert "backend tensorrt is unavailable: tensorrt not installed" in fields["Accel note"]
    assert "pip install tensorrt" in fields["Accel note"]
    assert numpy.array_equal(job.image(), baseline.image()) and job.batches == [2] * 6


def test_nothing_the_extension_overrides_survives_its_job(webui):
    before = webui.get("/sdapi/v1/options")
    baseline = webui.job()
    extension = webui.job(accel={"backend": "eager", "deepcache": True, "cfg_cutoff": True, "taesd": True})
    assert extension.ok, extension.error
    after_job = webui.job()
    assert numpy.array_equal(after_job.image(), baseline.image())
    assert after_job.batches == [2] * 6 and after_job.infotext == baseline.infotext
    assert webui.get("/sdapi/v1/options") == before


def test_taesd_files_absent_then_present(webui):
    from tools.taesd_factory import write_taesd_files

    missing = webui.job(accel={"backend": "eager", "taesd": True})
    assert missing.ok, missing.error
    fields = infotext_fields(missing)
    assert "Accel TAESD" not in fields and "taesd_decoder.pth" in fields["Accel note"]
    assert str(DATA / "models" / "VAE-taesd") in fields["Accel note"]
    write_taesd_files(DATA / "models" / "VAE-taesd", "sd", fmt="pth")
    present = webui.job(accel={"backend": "eager", "taesd": True})
    assert present.ok, present.error
    assert infotext_fields(present)["Accel TAESD"] == "on" and "VAE Decoder: TAESD" in present.infotext
    assert not numpy.array_equal(present.image(), missing.image())


def test_one_bad_setting_is_refused_alone(webui):
    status, _ = webui.post("/sdapi/v1/options", {"accel_cache_budget_gb": -5, "accel_memory_budget_gb": 3})
    options = webui.get("/sdapi/v1/options")
    core = webui.get("/comfy-accel/status")["settings"]
    assert options["accel_cache_budget_gb"] != -5 and core["cache_budget_gb"] != -5
    assert options["accel_memory_budget_gb"] == 3 and core["memory_budget_gb"] == 3
    assert "accel_cache_budget_gb not changed: cache_budget_gb must be a number between 0.1" in webui.log()
    webui.post("/sdapi/v1/options", {"accel_memory_budget_gb": 8})


def test_pasted_infotext_with_a_bad_value(webui):
    text = ("a cube\nSteps: 6, Sampler: Euler, Seed: 1, Size: 64x64, Accel backend: warp, Accel CFG cutoff: 40%, "
            "Accel DeepCache: \"interval 3, branch 1\"")
    status, values = webui.post("/accel-probe/paste", {"infotext": text})
    assert status == 200
    assert values["Backend"] is None   # left unchanged
    assert values["CFG cutoff"] is True and values["Skip the negative prompt from % of steps"] == 40.0
    assert values["DeepCache"] is True and values["Enable"] is True
    assert webui.log().count("unknown backend 'warp'") == 1
    step_cache = ("a cube\nSteps: 6, Sampler: Euler, Seed: 1, Size: 64x64, Accel backend: eager, Accel Step Cache: "
                  "\"taylor, interval 4, steps 0.25-0.8, max 2 in a row, skipped 2 of 6 steps\"")
    status, values = webui.post("/accel-probe/paste", {"infotext": step_cache})
    assert status == 200 and values["Step Cache (skip whole UNet calls; lossy)"] is True
    assert (values["Step Cache mode"], values["Step Cache interval (interval, taylor)"]) == ("taylor", 4)
    assert (values["Step Cache from (share of the steps)"], values["Step Cache until (share of the steps)"],
            values["Step Cache most skipped in a row"]) == (0.25, 0.8, 2)


def test_compile_backend_compiles_once_and_matches_eager(webui):
    eager = webui.job(steps=4)
    first = webui.job(accel={"backend": "inductor"}, steps=4)
    assert first.ok, first.error
    second = webui.job(accel={"backend": "inductor"}, steps=4)
    assert second.ok, second.error
    assert infotext_fields(first)["Accel backend"] == "inductor"
    assert first.accel["counts"]["compiled"] == 4 and first.accel["compile_events"] >= 1
    assert second.accel["compile_events"] == 0 and second.accel["counts"]["compiled"] == 4
    assert numpy.abs(first.image() - eager.image()).max() <= 2.0   # 8-bit pixels: fp reordering only
    assert "[comfy-accel] inductor: compiled for" in webui.log()   # info notices reach the console
    deepcache = webui.job(accel={"backend": "eager", "deepcache": True}, steps=4)
    both = webui.job(accel={"backend": "inductor", "deepcache": True}, steps=4)
    assert both.ok, both.error
    assert both.accel["counts"]["compiled"] == 4 and both.accel["counts"]["shallow"] == 2   # calls 1, 2 cached
    fields = infotext_fields(both)
    assert fields["Accel backend"] == "inductor" and fields["Accel DeepCache"] == "interval 3, branch 0"
    assert numpy.abs(both.image() - deepcache.image()).max() <= 2.0
    print(json.dumps({"eager_s": eager.seconds, "first_s": first.seconds, "second_s": second.seconds,
                      "deepcache_s": deepcache.seconds, "compiled_deepcache_s": both.seconds}))


def test_saved_settings_apply_at_startup(tmp_path):
    """A config.json with the section's values: the cache folder applies at start-up (not via the environment)."""
    host = WebUIHost(webui_path(), DATA, port=7862)
    folder = tmp_path / "accel-cache"
    host.write_config({"accel_cache_folder": str(folder), "accel_cache_budget_gb": "bad", "sd_unet": "None"})
    try:
        host.start()
        status = host.get("/comfy-accel/status")
        assert status["cache_root"] == str(folder)
        assert status["settings"]["cache_budget_gb"] != "bad"
        assert "setting accel_cache_budget_gb not applied (the default is used)" in host.log()
        assert host.get("/sdapi/v1/options")["accel_cache_budget_gb"] == status["settings"]["cache_budget_gb"]
        baseline = host.job()
        assert host.job(accel={"backend": "eager", "taesd": True, "cfg_cutoff": True}).ok
        assert numpy.array_equal(host.job().image(), baseline.image())
        assert host.get("/sdapi/v1/options")["sd_unet"] == "None"
    finally:
        host.stop()
        host.write_config({})


def write_random_lora(checkpoint: Path, out: Path, rank: int = 4, seed: int = 5) -> Path:
    """A kohya-style LoRA (`lora_unet_<compvis path>`) on every attention q/k/v of the test checkpoint's UNet."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    generator, tensors = torch.Generator().manual_seed(seed), {}
    with safe_open(str(checkpoint), "pt") as weights:
        for key in weights.keys():
            if ".attn" not in key or not key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")):
                continue
            out_features, in_features = weights.get_slice(key).get_shape()
            name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            down = torch.randn(rank, in_features, generator=generator) / in_features ** .5
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) / rank ** .5
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def test_a_lora_reaches_the_compiled_unet(webui):
    """A1111 patches LoRA weights in place (network_apply_weights): the compiled UNet computes with them."""
    models = DATA / "models"
    write_random_lora(models / "Stable-diffusion" / "accel_random_sd15.safetensors",
                      models / "Lora" / "accel_lora.safetensors")
    webui.post("/sdapi/v1/refresh-loras", {})
    with_lora = "a red cube <lora:accel_lora:1>"
    eager_lora = webui.job(prompt=with_lora, steps=4)
    compiled = webui.job(accel={"backend": "inductor"}, steps=4)
    compiled_lora = webui.job(prompt=with_lora, accel={"backend": "inductor"}, steps=4)
    again = webui.job(prompt=with_lora, accel={"backend": "inductor"}, steps=4)
    for job in (eager_lora, compiled, compiled_lora, again):
        assert job.ok, job.error
    assert "accel_lora" in compiled_lora.infotext and infotext_fields(compiled_lora)["Accel backend"] == "inductor"
    assert numpy.abs(compiled_lora.image() - eager_lora.image()).max() <= 2.0
    assert numpy.abs(compiled_lora.image() - compiled.image()).max() > 2.0   # the LoRA changed the image
    assert again.accel["compile_events"] == 0 and numpy.array_equal(again.image(), compiled_lora.image())
    print(json.dumps({"lora_first_compile_events": compiled_lora.accel["compile_events"]}))


def test_tensorrt_export_in_the_running_webui_with_its_lora(webui, tmp_path):
    """Up to the engine build inside A1111 (tensorrt needs a GPU): the export of its hijacked UNet under its own
    attention switch, with and without a LoRA applied in place. The engine key names the base weights (the same
    with the LoRA, and the one ComfyUI computes for the checkpoint); the ONNX holds the base weights, and the
    session's refit (into the ONNX: what TensorRT's refitter would get) brings exactly the LoRA's layers to their
    live values; onnxruntime runs both at a shape other than the traced one."""
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX needs onnxruntime")
    pytest.importorskip("onnx", reason="the export needs onnx in the WebUI's venv too (docs/webui.md)")
    from accelerators.tensorrt.engine import BuildSettings
    from accelerators.tensorrt.profiles import make_profile, profile_from_dict
    from accelerators.tensorrt.store import comfy_engine_key
    from tests.accelerators.tensorrt.test_tensorrt_webui import _comfy_patcher   # ours: tests/conftest.py

    models = DATA / "models"
    checkpoint = models / "Stable-diffusion" / "accel_random_sd15.safetensors"
    write_random_lora(checkpoint, models / "Lora" / "accel_lora.safetensors")
    webui.post("/sdapi/v1/refresh-loras", {})
    profile = make_profile((1, 2, 2), (64, 64, 128), (64, 64, 128), (77, 77, 154)).as_dict()
    exports = {}
    for name, prompt in (("base", "a red cube"), ("lora", "a red cube <lora:accel_lora:1>")):
        assert webui.job(prompt=prompt, steps=2).ok   # leaves A1111's LoRA state as the prompt asks
        status, exports[name] = webui.post("/accel-probe/tensorrt-export", {
            "profile": profile, "out": str(tmp_path / name), "tensorrt_version": "10.0-key-test"})
        assert status == 200, exports[name]
    base, lora = exports["base"], exports["lora"]
    assert not base["in_place"] and base["lora_weights"] == 0
    assert lora["in_place"] and lora["lora_weights"] >= len(lora["in_place"])   # q/k/v weights under refit
    assert lora["key_id"] == base["key_id"]
    assert base["attention"][0] == base["attention"][1]   # the user's attention optimization is back
    key = comfy_engine_key(_comfy_patcher(checkpoint), [profile_from_dict(profile)], BuildSettings(),
                           tensorrt_version="10.0-key-test", device="cpu")
    assert key.id == base["key_id"]
    io = {name: numpy.load(tmp_path / name / "io.npz") for name in exports}
    session = ort.InferenceSession(str(tmp_path / "lora" / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: io["lora"][n] for n in ("x", "timesteps", "context")})[0]
    assert numpy.allclose(got, io["base"]["out"], atol=1e-4, rtol=1e-3)   # the base weights, not the LoRA's
    assert not numpy.allclose(io["lora"]["out"], io["base"]["out"], atol=1e-3)   # the LoRA was applied live
    # the refit of exactly the layers A1111's LoRA patched brings the engine to the live UNet
    assert base["refitted"] == 0 and lora["refitted"] == lora["lora_weights"]
    refitted = ort.InferenceSession(str(tmp_path / "lora" / "refitted.onnx"), providers=["CPUExecutionProvider"])
    got = refitted.run(None, {n: io["lora"][n] for n in ("x", "timesteps", "context")})[0]
    assert numpy.allclose(got, io["lora"]["out"], atol=1e-4, rtol=1e-3)
