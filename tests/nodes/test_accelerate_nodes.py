"""Node "Accelerate Model" in the real ComfyUI server: listed with its backends, a shared workflow naming a
backend this machine lacks still runs (eager, with the reason in the notices), `auto` on this CPU runs eager
and says why, an unknown backend name is refused by the host's validation with the allowed values."""
import pytest

from tests.nodes.prompts import sampling_prompt


def prompt_with(backend, prefix):
    return sampling_prompt("AccelAccelerateModel", {"backend": backend}, prefix)


def test_object_info_lists_accelerate_model_with_its_backends(comfy_server):
    node = comfy_server.get("/object_info")["AccelAccelerateModel"]
    assert node["display_name"] == "Accelerate Model"
    backends = node["input"]["required"]["backend"][0]
    assert backends[:2] == ["auto", "default"] and {"inductor", "inductor+cudagraphs", "onediff", "stable-fast",
                                                    "tensorrt", "eager"} <= set(backends)
    assert node["input"]["optional"]["fallback"][0] == ["default", "eager", "error"]


def test_a_workflow_naming_a_missing_backend_still_runs(pack, comfy_server):
    from comfy_accel.accelerators.tensorrt import available

    if available():
        pytest.skip("TensorRT is available here")
    entry = comfy_server.run_prompt(prompt_with("tensorrt", "accel_test/accelerate_trt"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["6"]["latents"]
    notices = comfy_server.get("/accel/notices")["notices"]
    assert any(n["node"] == "2" and available().reason in n["message"] and "running eager" in n["message"]
               for n in notices), notices[-5:]


def test_auto_on_a_machine_without_a_gpu_runs_eager_and_says_why(pack, comfy_server):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks what auto does on a machine without a GPU")
    import time

    started = time.time()   # other tests' prompts also have a node "2": only this prompt's notices count
    entry = comfy_server.run_prompt(prompt_with("auto", "accel_test/accelerate_auto"), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    notices = [n for n in comfy_server.get("/accel/notices")["notices"] if n["time"] >= started]
    assert any(n["node"] == "2" and n["message"].startswith("auto picked eager: torch sees no CUDA GPU here")
               for n in notices), notices[-5:]
    assert not any(n["node"] == "2" and "compil" in n["message"] and "auto" not in n["message"] for n in notices)


def test_an_unknown_backend_is_refused_with_the_allowed_values(comfy_server):
    from tools.comfy_host import HostError

    with pytest.raises(HostError, match="backend") as err:
        comfy_server.queue_prompt(prompt_with("warp", "accel_test/bad_backend"))
    assert "warp" in str(err.value)


@pytest.fixture(scope="module")
def refused(pack):
    """(backend, model) where the backend's lane refuses a model the factory builds, or a skip when every lane
    serves them all (what the lanes serve grows; whatever they refuse must follow the fallback policy)."""
    from comfy_accel.accelerators import options, registry
    from comfy_accel.accelerators.base import AcceleratorInputError
    from tools.model_factory import MODEL_SPECS, build_model

    for name in sorted((n for n in MODEL_SPECS if n.startswith("tiny-")), key=lambda n: "sd" in n):
        model = build_model(name)
        for backend in options.BACKENDS:
            try:
                registry.get(backend).apply(model, {"fallback": "error"})
            except AcceleratorInputError:
                return backend, model
            except Exception:   # the backend cannot run here at all (BackendUnavailable): not a refusal
                continue
    pytest.skip("every lane serves every model tools/model_factory builds")


@pytest.mark.parametrize("asked", ["auto", "refusing"])
def test_a_model_the_lane_cannot_serve_runs_eager_under_the_default_policy(refused, asked):
    from comfy_accel.accelerators import events
    from comfy_accel.nodes.accelerate import AccelerateModel
    from comfy_accel.nodes.metadata import in_effect

    backend, model = refused
    asked = backend if asked == "refusing" else asked
    family = type(model.model.model_config).__name__
    with events.collect() as raised:
        result = AccelerateModel().accelerate(model, backend=asked, unique_id="61")
    (out,) = result["result"]
    assert out is not model and not out.wrappers.get("apply_model"), "nothing may be attached: it runs eager"
    settings = out.model_options["comfy_accel_applied"]["accelerate_model"]
    warnings = [n["message"] for n in raised if n["level"] == "warning" and n["node"] == "61"]
    if settings["backend"] == "eager":   # `auto` chose eager here (a CPU): no lane was asked
        assert asked == "auto" and not warnings and settings["note"].startswith("auto"), (settings, warnings)
        return
    if settings["backend"] != backend:   # `auto` picked a lane that serves this model
        pytest.skip(f"auto picked {settings['backend']}, which serves this model")
    (line,) = warnings
    said = f"backend 'auto' (picked {backend})" if asked == "auto" else f"backend '{backend}'"
    assert line.startswith(f"{said}: ") and f"this MODEL is {family}" in line, line
    assert line.endswith("; running eager"), line
    effect = in_effect({"accelerate_model": settings}, {"accelerate_model": "61"}, [])["accelerate_model"]
    assert effect["used"] == f"eager (fallback: {line.removesuffix('; running eager')})", effect
    assert result["ui"]["comfy_accel"][0]["attached"] == "eager", result["ui"]


def test_a_model_the_lane_cannot_serve_fails_under_error_naming_what_was_asked(refused):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.nodes.accelerate import AccelerateModel

    backend, model = refused
    family = type(model.model.model_config).__name__
    with pytest.raises(AcceleratorInputError, match=rf"^backend '{backend}': .*this MODEL is {family}"):
        AccelerateModel().accelerate(model, backend=backend, fallback="error", unique_id="62")
