"""options.py's one backend rule (`default` = the settings' backend, `auto` = the fastest here: eager on a CPU),
and Accelerate Model with `auto` on this CPU in the real ComfyUI: it runs eager and says why."""
import pytest
import torch

from tools.model_factory import sample


def availability_of(table):
    """Answers like the registry's for the backends named (None: not part of this install)."""
    return lambda name: table.get(name)


def test_auto_on_a_cpu_picks_eager_and_says_why(pack):
    from comfy_accel.accelerators.base import Availability
    from comfy_accel.accelerators.options import resolve_backend
    from comfy_accel.accelerators.settings import Settings

    everything = availability_of({"inductor": Availability(True, "gcc")})
    choice = resolve_backend("auto", Settings(), everything, gpu=Availability(False, "no GPU"))
    assert (choice.backend, choice.missing) == ("eager", "")
    assert choice.note.startswith("auto picked eager: torch sees no CUDA GPU here")


def test_auto_on_a_gpu_picks_the_first_available_of_the_auto_order(pack):
    from comfy_accel.accelerators.base import Availability
    from comfy_accel.accelerators.options import AUTO_ORDER, resolve_backend
    from comfy_accel.accelerators.settings import Settings

    gpu = Availability(True, "NVIDIA H200")
    no_graphs = availability_of({"inductor+cudagraphs": Availability(False, "triton not installed"),
                                 "stable-fast": Availability(True, "sfast found"), "onediff": None})
    choice = resolve_backend("auto", Settings(default_backend="tensorrt"), no_graphs, gpu=gpu)
    assert choice.backend == "stable-fast" and AUTO_ORDER.index("stable-fast") == 1
    assert choice.note == ("auto picked stable-fast, the fastest available here (sfast found); "
                           "not inductor+cudagraphs: triton not installed")
    nothing = resolve_backend("auto", Settings(), availability_of({}), gpu=gpu)
    assert nothing.backend == "eager" and nothing.missing.startswith("no compile backend can run here")


def test_default_is_the_settings_backend_and_auto_ignores_it(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError, Availability
    from comfy_accel.accelerators.options import resolve_backend
    from comfy_accel.accelerators.settings import Settings

    cpu = Availability(False, "no GPU")
    assert resolve_backend("default", Settings(default_backend="tensorrt"), gpu=cpu).backend == "tensorrt"
    via_auto = resolve_backend("default", Settings(default_backend="auto"), gpu=cpu)
    assert via_auto.backend == "eager"
    assert via_auto.note.startswith("default backend from the settings: auto; auto picked eager")
    assert resolve_backend("auto", Settings(default_backend="tensorrt"), gpu=cpu).backend == "eager"
    assert resolve_backend("onediff", Settings(), gpu=cpu).backend == "onediff"   # named: no choice made
    with pytest.raises(AcceleratorInputError, match="unknown backend 'warp'; choose one of: auto, default"):
        resolve_backend("warp", Settings())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what auto does on a machine without a GPU")
def test_accelerate_model_node_with_auto_runs_eager_on_this_cpu_and_says_so(pack, tiny_sd15):
    from comfy_accel.accelerators import events

    seen = []
    listener = lambda event, data: seen.append(data) if event == "accel.notice" else None  # noqa: E731
    events.add_listener(listener)
    try:
        node = pack.NODE_CLASS_MAPPINGS["AccelAccelerateModel"]()
        (out,) = node.accelerate(tiny_sd15, backend="auto", fallback="error", unique_id="auto-cpu")
    finally:
        events.remove_listener(listener)
    applied = out.model_options["comfy_accel_applied"]["accelerate_model"]
    assert applied["backend"] == "eager" and applied["requested"] == "auto"
    assert "auto picked eager: torch sees no CUDA GPU here" in applied["note"]
    assert any(n["node"] == "auto-cpu" and n["message"] == applied["note"] for n in seen)
    assert not out.wrappers.get("apply_model")   # nothing compiles: the UNet runs as the host's
    assert torch.equal(sample(out, steps=2), sample(tiny_sd15, steps=2))
