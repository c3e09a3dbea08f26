"""What the saved image and `/history` say ran, in a real ComfyUI server: right on every run, also when ComfyUI
serves the accelerator node from its output cache (the second prompt of a workflow, another seed)."""
import json
from pathlib import Path

import pytest

from tests.nodes.prompts import sampling_prompt

# every backend that can fall back on a machine without a GPU or the backend's library
FALLBACK_BACKENDS = ("tensorrt", "stable-fast", "onediff", "inductor+cudagraphs")


def image_prompt(backend: str, seed: int, prefix: str) -> dict:
    """UNETLoader → Accelerate Model → KSampler → Tiny VAE decode → SaveImage (a real PNG, in seconds)."""
    prompt = sampling_prompt("AccelAccelerateModel", {"backend": backend}, prefix)
    prompt["5"]["inputs"]["seed"] = seed
    prompt["8"] = {"class_type": "AccelTinyVAE", "inputs": {"vae_family": "auto", "model": ["1", 0]}}
    prompt["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["8", 0]}}
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}}
    return prompt


def png_record(server, entry) -> dict:
    from PIL import Image

    image = entry["outputs"]["10"]["images"][0]
    with Image.open(Path(server.base) / "output" / image["subfolder"] / image["filename"]) as png:
        return json.loads(png.text["comfy_accel"])


_runs: dict = {}


def two_runs(server, backend: str) -> tuple[dict, dict]:
    """The same workflow twice with another seed: the second run's Accelerate Model comes from ComfyUI's cache."""
    if backend not in _runs:
        from tools.taesd_factory import write_taesd_files

        write_taesd_files(Path(server.base) / "models" / "vae_approx", "sd")
        prefix = f"accel_test/meta_{backend.replace('+', '_')}"
        entries = []
        for seed in (3, 4):
            entry = server.run_prompt(image_prompt(backend, seed, prefix), timeout=300)
            assert entry["status"]["status_str"] == "success", entry["status"]
            entries.append(entry)
        cached = [m[1]["nodes"] for m in entries[1]["status"]["messages"] if m[0] == "execution_cached"]
        assert "2" in cached[0], "the second prompt should take Accelerate Model from ComfyUI's cache"
        _runs[backend] = tuple(entries)
    return _runs[backend]


def missing_reason(server, backend: str) -> str:
    """Why the server cannot run `backend` (its /accel/status); skips where it can."""
    row = next(r for r in server.get("/accel/status")["accelerators"] if r["name"] == backend)
    if row["available"]:
        pytest.skip(f"{backend} runs here ({row['reason']}): nothing falls back")
    return row["reason"]


@pytest.mark.parametrize("backend", FALLBACK_BACKENDS)
def test_the_image_says_eager_on_every_run_when_the_backend_cannot_run_here(comfy_server, backend):
    reason = missing_reason(comfy_server, backend)
    first, second = (png_record(comfy_server, entry) for entry in two_runs(comfy_server, backend))
    for record in (first, second):
        effect = record["in_effect"]["accelerate_model"]
        assert effect == {"node": "2", "used": f"eager (fallback: {reason})", "fallback": reason}, effect
        assert record["applied"]["accelerate_model"]["backend"] == backend
    assert second["in_effect"] == first["in_effect"]


def test_a_session_that_falls_back_on_every_call_is_listed_on_every_run(comfy_server):
    """The TensorRT session attached without TensorRT falls back on every UNet call but logs it once: the
    second prompt's record still lists that line, raised while its KSampler ran."""
    reason = missing_reason(comfy_server, "tensorrt")
    for entry in two_runs(comfy_server, "tensorrt"):
        notices = png_record(comfy_server, entry)["notices"]
        assert {"accelerator": "tensorrt", "message": f"{reason}; running eager", "level": "warning", "node": "2",
                "while_running": "5"} in notices, notices


def test_history_carries_the_fallback_reason_for_an_api_client(comfy_server):
    """An API client reads /history: on every run the prompt's record (the PNG's "comfy_accel" entry) says what
    its sampling ran; where the accelerator node ran (not served from ComfyUI's cache), its UI output also says
    what it attached and why that runs eager."""
    backend = "tensorrt"
    reason = missing_reason(comfy_server, backend)
    histories = []
    for entry in two_runs(comfy_server, backend):
        prompt_id = entry["prompt"][1]
        history = comfy_server.get(f"/history/{prompt_id}")[prompt_id]
        record = history["prompt"][3]["extra_pnginfo"]["comfy_accel"]
        assert record["in_effect"]["accelerate_model"]["fallback"] == reason
        assert record == png_record(comfy_server, history)
        histories.append(history)
    (shown,) = histories[0]["outputs"]["2"]["comfy_accel"]
    assert shown == {"accelerator": "accelerate_model", "requested": backend, "attached": "eager",
                     "fallback": reason}, shown
