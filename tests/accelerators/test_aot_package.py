"""AOTInductor UNet packages on the real ComfyUI UNet (CPU), from one compile of the tiny SD1.5 model: the output
matches eager, the weights are read live (in-place edits seen, replaced Parameters detected and rebound), wrong
weights and inputs are refused with the reason instead of a crash, and a fresh process that only loads the
package gets the parent's output.
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.tiny_unet import tiny_unet_or_skip
from tools.model_factory import build_model, unet_inputs

pytestmark = pytest.mark.slow   # builds AOTInductor packages, and fresh processes load them

SEED = 31
ATTN_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"   # a 2-D Linear weight
CONV_IN = "input_blocks.0.0.weight"
OUT_BIAS = "out.2.bias"   # (4,): what inductor bakes into the code unless told to keep tensor constants


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def eager(unet, inputs):
    x, t, context, *y = inputs
    with torch.no_grad():
        return unet(x, t, context=context, y=y[0] if y else None, transformer_options={})


@pytest.fixture(scope="module")
def built(pack, tmp_path_factory):
    """The one compile of this module: the tiny SD1.5 UNet at batch 2, 64×64 px, 77 tokens."""
    from comfy_accel.accelerators.aot_package import PackagedUNet, available

    _, unet, inputs = tiny_unet_or_skip(available(), SEED)
    folder = tmp_path_factory.mktemp("aot") / "package"
    package = PackagedUNet.build(unet, inputs, {}, folder)
    return SimpleNamespace(unet=unet, inputs=inputs, package=package, folder=folder)


def test_package_matches_eager_and_holds_code_not_weights(built):
    from comfy_accel.accelerators.aot_package import live_weights

    unet, package = built.unet, built.package
    out = package(*built.inputs)
    assert out.shape == built.inputs[0].shape and rel(out, eager(unet, built.inputs)) < 1e-4

    record = json.loads((built.folder / "weights.json").read_text())
    assert set(record["weights"]) == set(live_weights(unet)) == {"unet." + n for n, _ in unet.named_parameters()}
    assert record["weights"]["unet." + OUT_BIAS] == {"shape": [4], "stride": [1], "dtype": "float32",
                                                      "device": "cpu"}
    assert [(i["name"], i["shape"]) for i in record["inputs"]] == [
        ("x", [2, 4, 8, 8]), ("timesteps", [2]), ("context", [2, 77, 64])]
    with zipfile.ZipFile(built.folder / "unet.pt2") as archive:
        names = archive.namelist()
    assert not any("constants" in n or n.endswith((".pt", ".bin", ".safetensors")) for n in names), names


def test_in_place_weight_edits_are_seen_by_the_next_call(built):
    unet, package = built.unet, built.package
    params = dict(unet.named_parameters())
    before = eager(unet, built.inputs)
    saved = {name: params[name].detach().clone() for name in (CONV_IN, OUT_BIAS)}
    try:
        with torch.no_grad():
            params[CONV_IN].data.add_(0.05)    # what a LoRA patched in place does
            params[OUT_BIAS].data.add_(0.5)
        assert not package.needs_rebind(unet)
        edited = eager(unet, built.inputs)
        assert rel(edited, before) > 1e-3
        assert rel(package(*built.inputs), edited) < 1e-4
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].data.copy_(value)
    assert rel(package(*built.inputs), before) < 1e-5


def test_a_replaced_parameter_needs_a_rebind_and_is_seen_after_it(built):
    import comfy.utils

    unet, package = built.unet, built.package
    before = eager(unet, built.inputs)
    original = comfy.utils.get_attr(unet, OUT_BIAS)
    comfy.utils.set_attr_param(unet, OUT_BIAS, original.detach() + 0.5)   # ComfyUI's copying patch path
    try:
        assert package.needs_rebind(unet)
        replaced = eager(unet, built.inputs)
        assert rel(package(*built.inputs), before) < 1e-5          # still reads the old tensor
        assert rel(replaced, before) > 1e-3
        package.bind(unet)
        assert not package.needs_rebind(unet)
        assert rel(package(*built.inputs), replaced) < 1e-4

        # the same Parameter object given new storage also moves the address the code reads
        param = comfy.utils.get_attr(unet, OUT_BIAS)
        param.data = param.data.clone()
        assert package.needs_rebind(unet)
    finally:
        comfy.utils.set_attr(unet, OUT_BIAS, original)
        package.bind(unet)
    assert not package.needs_rebind(unet)
    assert rel(package(*built.inputs), before) < 1e-5


def test_a_loaded_package_refuses_to_run_unbound_or_with_mismatched_weights(built):
    import comfy.utils

    from comfy_accel.accelerators.aot_package import PackagedUNet, PackageMismatch

    package = PackagedUNet.load(built.folder)
    assert package.needs_rebind(built.unet)
    with pytest.raises(RuntimeError, match="not bound"):
        package(*built.inputs)

    other = build_model("tiny-sd15", seed=SEED + 1).model.diffusion_model
    k = comfy.utils.get_attr(other, ATTN_K).detach()
    wrong = [("dtype float16 instead of float32", comfy.utils.get_attr(other, CONV_IN).detach().half(), CONV_IN),
             ("shape [1, 64] instead of [32, 64]", k[:1], ATTN_K),
             ("stride [1, 32] instead of [64, 1]", k.t().contiguous().t(), ATTN_K)]
    for message, value, name in wrong:
        original = comfy.utils.set_attr_param(other, name, value)
        try:
            with pytest.raises(PackageMismatch, match=re.escape(f"weight unet.{name} has {message}")):
                package.bind(other)
        finally:
            comfy.utils.set_attr(other, name, original)
    with pytest.raises(RuntimeError, match="not bound"):   # a refused bind binds nothing
        package(*built.inputs)

    # bound to another checkpoint of the architecture: that checkpoint's output, from the same code
    package.bind(other)
    out = package(*built.inputs)
    assert rel(out, eager(other, built.inputs)) < 1e-4 and rel(out, eager(built.unet, built.inputs)) > 1e-2


def test_matches_says_why_other_inputs_cannot_use_the_package(built):
    package = built.package
    x, t, context = built.inputs
    assert package.matches(built.inputs) == "" and package.matches((x, t, context, None)) == ""
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=built.unet), load_device=torch.device("cpu"))
    one = unet_inputs(model, batch=1)[:3]
    larger = unet_inputs(model, batch=2, height=96, width=96)[:3]
    assert package.matches(one) == "x has shape [1, 4, 8, 8] instead of [2, 4, 8, 8]"
    assert package.matches(larger) == "x has shape [2, 4, 12, 12] instead of [2, 4, 8, 8]"
    assert package.matches((x, t, context[:, :10])).startswith("context has shape [2, 10, 64]")
    assert package.matches((x.double(), t, context)) == "x has dtype float64 instead of float32"
    assert package.matches((x.transpose(2, 3), t, context)).startswith("x has stride")
    assert package.matches((x, t, context, torch.zeros(2, 8))).startswith("the package takes 3 inputs")
    with pytest.raises(ValueError, match="batch|shape"):
        package(*one)


def test_a_fresh_process_loads_the_stored_package_and_gets_the_same_output(built, tmp_path):
    from comfy_accel.accelerators.aot_package import package_files, write_package_files

    files = package_files(built.folder)
    assert set(files) == {"unet.pt2", "weights.json"}
    with pytest.raises(ValueError, match="weights.json missing"):
        write_package_files({"unet.pt2": files["unet.pt2"]}, tmp_path / "partial")
    restored = write_package_files(files, tmp_path / "restored")

    torch.save(built.inputs, tmp_path / "inputs.pt")
    worker = Path(__file__).with_name("package_worker.py")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-inductor-cache")}
    done = subprocess.run([sys.executable, str(worker), "aoti", str(restored), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt"), str(SEED)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    timings = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    out = torch.load(tmp_path / "out.pt")
    assert rel(out, eager(built.unet, built.inputs)) < 1e-4
    assert torch.equal(out, built.package(*built.inputs))
    print(f"fresh process: load {timings['load_s']:.2f} s, bind {timings['bind_s']:.3f} s, "
          f"call {timings['call_s']:.3f} s")


def test_a_new_package_was_loaded_and_run_by_a_child_process_before_this_one(built):
    """The build hands the package to a child process first (a loader crash kills the child, not ComfyUI); the
    child's report is kept in weights.json and names exactly the weights the package reads."""
    from comfy_accel.accelerators.aot_package import FORMAT_VERSION

    record = json.loads((built.folder / "weights.json").read_text())
    assert record["format"] == FORMAT_VERSION and record["torch"] == torch.__version__
    assert set(record["verified"]) == {"load_s", "call_s"}   # no graph_s: CUDA graphs are checked on CUDA only
    assert all(v >= 0 for v in record["verified"].values())
    assert set(record["weights"]) == set(built.package.loader.get_constant_fqns())


def test_a_child_that_crashes_or_fails_is_reported_in_one_line(built, tmp_path):
    from comfy_accel.accelerators.aot_package import child_outcome, package_files, verify_in_child, \
        write_package_files

    # a real crash of a real process, as a loader segfault ends the child; the stage it last announced is named
    crashed = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], capture_output=True,
                             text=True, timeout=60)
    assert crashed.returncode < 0
    outcome = child_outcome(crashed.returncode, crashed.stdout, crashed.stderr)
    assert outcome == {"error": "loading the package killed a child process (SIGSEGV)"}
    crashed = subprocess.run([sys.executable, "-c", "print('PACKAGE-STAGE opening the package'); "
                              "print('PACKAGE-STAGE running it', flush=True); import ctypes; ctypes.string_at(0)"],
                             capture_output=True, text=True, timeout=60)
    outcome = child_outcome(crashed.returncode, crashed.stdout, crashed.stderr)
    assert outcome == {"error": "loading the package killed a child process (SIGSEGV while running it)"}

    # a package file that is not an archive at all: the loader raises in the child, whose last line is the reason
    files = package_files(built.folder)
    folder = write_package_files({**files, "unet.pt2": b"not a zip archive" * 64}, tmp_path / "damaged")
    outcome = verify_in_child(folder, timeout=240)
    assert set(outcome) == {"error"}, outcome
    assert re.search(r"failed \(exit 1 while opening the package\): \S", outcome["error"]), outcome

    # a package that reads a tensor the recorded model lacks: refused by the child's own check
    record = json.loads(files["weights.json"])
    dropped = sorted(record["weights"])[0]
    del record["weights"][dropped]
    folder = write_package_files({**files, "weights.json": json.dumps(record).encode()}, tmp_path / "other-model")
    outcome = verify_in_child(folder, timeout=240)
    assert outcome == {"error": f"loading the package in a child process failed (exit 3 while opening the "
                                f"package): the package reads 1 "
                                f"tensor(s) that are not weights of the model, e.g. {dropped}"}

    outcome = verify_in_child(built.folder, timeout=0.05)   # too short to even import torch
    assert outcome == {"error": "loading the package in a child process did not finish in 0.05 s"}
