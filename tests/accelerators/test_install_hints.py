"""The optional backends' unavailable-reasons name what actually installs them for the torch in use (one line a
user can act on), and `tools/bench.py --list` (what ./run_demo.sh --list runs) prints them."""
import contextlib
import io
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_stable_fast_points_at_the_wheel_that_exists_or_the_build_script(pack):
    from comfy_accel.accelerators.compile.stable_fast import install_hint

    assert "pip install stable-fast-pruna==1.0.8" in install_hint("2.9.1")   # its wheels need torch 2.9
    for version in ("2.10.0", "2.11.0", "2.13.0"):
        hint = install_hint(version)
        assert "tools/build_stable_fast.sh" in hint and f"torch {version}" in hint and "pruna" not in hint
    assert (REPO / "tools" / "build_stable_fast.sh").is_file()


def test_onediff_says_its_compilers_need_torch_2_5(pack):
    from comfy_accel.accelerators.compile.onediff import install_hint

    assert install_hint("2.5.1") == "pip install onediff nexfort"
    hint = install_hint("2.11.0")
    assert "torch 2.11.0" in hint and "nexfort needs torch ≤ 2.5.1" in hint and "oneflow" in hint


def test_tensorrt_names_the_package_for_the_cuda_and_nvidia_s_index(pack):
    from comfy_accel.accelerators.tensorrt import install_hint

    assert install_hint("13.0").startswith("pip install tensorrt-cu13 --extra-index-url https://pypi.nvidia.com")
    assert install_hint("12.8").startswith("pip install tensorrt-cu12 ")
    assert install_hint(None).startswith("pip install tensorrt ") and "developer.nvidia.com/tensorrt" in install_hint(None)


def test_reasons_here_are_one_actionable_line(pack):
    from comfy_accel.accelerators import tensorrt
    from comfy_accel.accelerators.compile import onediff, stable_fast

    version = torch.__version__.split("+")[0]
    expected = {stable_fast: stable_fast.install_hint(version), onediff: onediff.install_hint(version),
                tensorrt: tensorrt.install_hint(torch.version.cuda)}
    checked = 0
    for module, hint in expected.items():
        ready = module.available()
        assert "\n" not in ready.reason
        if not ready and "not installed" in ready.reason:
            assert ready.reason.endswith(hint)
            checked += 1
    if not checked:
        pytest.skip("every optional backend is installed here")


def test_bench_list_prints_the_reasons(pack):
    from comfy_accel.accelerators import tensorrt
    from comfy_accel.accelerators.compile import onediff, stable_fast
    from tools import bench

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(["--list"]) == 0
    lines = {line.split()[0]: line for line in printed.getvalue().splitlines() if line.strip()}
    for name, module in (("stable-fast", stable_fast), ("onediff", onediff), ("tensorrt", tensorrt)):
        ready = module.available()
        if not ready:
            assert lines[name].endswith(f"skip: {name}: {ready.reason}"), lines[name]
    from tools.optional_libraries import xformers_status

    assert lines["xformers"].endswith(xformers_status()[1])


def test_xformers_hint_names_the_release_that_fits(pack):
    from tools.optional_libraries import xformers_hint, xformers_status

    assert xformers_hint("2.11.0", "13.0") == 'pip install "xformers>=0.0.35" nvidia-cuda-runtime-cu12 ' \
                                              '(it links the CUDA 12 runtime)'
    assert xformers_hint("2.10.0", "12.8") == 'pip install "xformers>=0.0.35"'
    assert "built for torch 2.9.1" in xformers_hint("2.9.1", "12.8")
    usable, line = xformers_status()
    assert "\n" not in line and (usable or "pip install" in line)
