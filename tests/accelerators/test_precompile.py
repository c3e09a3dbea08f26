"""Dynamo's precompile of the whole UNet (the warm-restart artifact of inductor+cudagraphs where torch has it) on
the real ComfyUI UNet, CPU, from one build by a compile session: the session stores it; a second session loads it
from the store and compiles nothing; the output matches eager; the weights are read live (in-place edits, another
model of the architecture); other inputs are refused with the reason; a fresh process that only loads it traces
nothing and gets the parent's output. These are also the tests that fail when torch changes the experimental API
(compile/precompile.py is the one place that uses it).
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.tiny_unet import tiny_unet_or_skip
from tools.model_factory import build_model

pytestmark = pytest.mark.slow   # compiles the UNet ahead of time, and a fresh process loads it

SEED = 51


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def eager(unet, inputs):
    x, t, context = inputs
    with torch.inference_mode():
        return unet(x, t, context=context, transformer_options={})


def unet_options() -> dict:
    """transformer_options as the session's stand-in passes them (attention through SDPA, which dynamo traces)."""
    from comfy_accel.accelerators.compile.stand_in import use_compile_friendly_attention

    options: dict = {}
    use_compile_friendly_attention(options)
    return options


def precompile_session(model, store):
    from comfy_accel.accelerators.compile.inductor import apply
    from comfy_accel.accelerators.compile.stand_in import session_of

    session = session_of(apply(model, {"fallback": "error", "store": store}))
    session.compiler.use_precompile(True)   # what inductor+cudagraphs (a GPU backend) sets by default
    return session


@pytest.fixture(scope="module")
def built(pack, tmp_path_factory):
    """The one build of this module: the tiny SD1.5 UNet at batch 2, 64×64 px, 77 tokens, through a session."""
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compile.session import bucket_of
    from comfy_accel.accelerators.compile.precompile import available

    model, unet, inputs = tiny_unet_or_skip(available(), SEED)
    store = ArtifactStore(tmp_path_factory.mktemp("precompile") / "cache")
    session = precompile_session(model, store)
    assert session.artifacts.uses_package({})
    bucket = bucket_of(inputs[0], inputs[2], None)
    with torch.inference_mode():
        call = session.graph_callable(unet, bucket, inputs, unet_options())
        out = call(*inputs)
    return SimpleNamespace(model=model, unet=unet, inputs=inputs, store=store, session=session, call=call,
                           out=out, bucket=bucket)


def test_the_session_builds_stores_and_a_second_session_loads_it_compiling_nothing(built):
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.compile.precompile import PrecompiledUNet
    from comfy_accel.accelerators.compile.inductor import INDUCTOR_PRECOMPILE

    assert isinstance(built.call, PrecompiledUNet) and not built.session.artifacts.package_failed
    assert [e["what"] for e in built.session.compiler.compile_events] == ["unet package"]
    assert rel(built.out, eager(built.unet, built.inputs)) < 1e-4
    entries = [e for e in built.store.entries() if e.accelerator == INDUCTOR_PRECOMPILE]
    assert [built.store.lookup_id(e.id).entry.meta.get("kind") for e in entries] == ["precompiled UNet"]

    second = precompile_session(built.model, built.store)
    with torch.inference_mode():
        loaded = second.graph_callable(built.unet, built.bucket, built.inputs, unet_options())
        out = loaded(*built.inputs)
    assert isinstance(loaded, PrecompiledUNet) and second.compiler.compile_events == []
    assert torch.equal(out, built.out)
    notes = [n["message"] for n in events.recent(20)]
    assert any("warm start: precompiled UNet for" in n and "loaded from the cache" in n for n in notes), notes
    # through run_bucket, as a sampler calls it, the progress toast and the bucket's line say it compiled nothing
    heard = []
    listener = lambda event, data: heard.append(data) if event == "accel.progress" else None  # noqa: E731
    events.add_listener(listener)
    try:
        with torch.inference_mode():   # as ComfyUI samples (outside it the tensor guards refuse the call)
            second.run_bucket(built.bucket, lambda: loaded(*built.inputs), lambda: None, packaged=True)
    finally:
        events.remove_listener(listener)
    assert heard and all(d["task"].startswith("loading the compiled UNet") for d in heard), heard
    third = precompile_session(built.model, built.store)   # nothing loaded yet: the store tells
    assert third.first_use_task(built.bucket, packaged=True).startswith("loading the compiled UNet")
    assert third.first_use_task(built.bucket, packaged=False).startswith("compiling the UNet")
    assert any(n["message"].startswith("ready (loaded from the cache, nothing compiled) for batch 2")
               for n in events.recent(5)), events.recent(5)


def test_the_weights_are_read_live_in_place_edits_and_another_model(built):
    weight = built.unet.input_blocks[0][0].weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)   # what a LoRA patched in place does to the tensor
        with torch.inference_mode():
            edited = built.call(*built.inputs)
        assert rel(edited, eager(built.unet, built.inputs)) < 1e-4 and rel(edited, built.out) > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(saved)

    other = build_model("tiny-sd15", seed=SEED + 1).model.diffusion_model   # another checkpoint, same shapes
    assert built.call.needs_rebind(other)
    built.call.bind(other)
    try:
        with torch.inference_mode():
            out = built.call(*built.inputs)
        assert rel(out, eager(other, built.inputs)) < 1e-4
    finally:
        built.call.bind(built.unet)
    assert not built.call.needs_rebind(built.unet)


def test_other_inputs_and_other_torch_builds_are_refused_with_the_reason(built, tmp_path):
    from comfy_accel.accelerators.compile.precompile import PackageMismatch, PrecompiledUNet, precompile_files

    x, t, c = built.inputs
    assert built.call.matches(built.inputs) == ""
    assert "shape" in built.call.matches((x[:1], t[:1], c[:1]))
    assert "dtype" in built.call.matches((x.double(), t, c))
    assert "takes 3 inputs" in built.call.matches((x, t, c, torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="do not fit the precompiled UNet"):
        built.call(x[:1], t[:1], c[:1])
    with pytest.raises(RuntimeError, match="Guard"):   # outside inference_mode: refused by its guard, not run
        built.call(*built.inputs)

    files = precompile_files(built.store.lookup(built.session.artifacts.package_key(built.bucket)).entry.path)
    assert set(files) == {"unet.precompiled", "record.json"}
    record = json.loads(files["record.json"])
    record["torch"] = "0.0.1"
    (tmp_path / "unet.precompiled").write_bytes(files["unet.precompiled"])
    (tmp_path / "record.json").write_text(json.dumps(record))
    with pytest.raises(PackageMismatch, match="built with torch 0.0.1"):
        PrecompiledUNet.load(tmp_path, built.unet, unet_options())


def test_a_fresh_process_loads_it_traces_nothing_and_gets_the_same_output(built, tmp_path):
    folder = built.store.lookup(built.session.artifacts.package_key(built.bucket)).entry.path
    torch.save(built.inputs, tmp_path / "inputs.pt")
    worker = Path(__file__).with_name("package_worker.py")
    # inductor's cache as this process left it: on a CPU the precompiled file holds the kernels' C++ source,
    # compiled again where the cache is empty (≈30 s here; on a GPU the kernels are in the file)
    done = subprocess.run([sys.executable, str(worker), str(folder), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt"), str(SEED)], env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    assert result["frames_traced"] == 0, result
    assert torch.equal(torch.load(tmp_path / "out.pt"), built.out)
    print(f"fresh process: load {result['load_s']:.2f} s, first call {result['call_s']:.3f} s")
