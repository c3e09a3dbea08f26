"""The benches' stack tables (tools/bench_stacks.py) agree with themselves and with what names them: every stack a
bench accepts builds on this machine or says why it cannot, and the stack lists of tools/gpu_runs.sh exist."""
import re

from tools.bench_stacks import (DIT_STACKS, STEP_CACHE_2, UNET_STACKS, forced_skips, stack_availability,
                                stack_named)
from tools.comfy_host import REPO_ROOT


def test_the_tables_name_each_stack_once_and_their_twins_exist():
    for stacks in (UNET_STACKS, DIT_STACKS):
        names = [stack.name for stack in stacks]
        assert len(names) == len(set(names)), names
        for stack in stacks:
            assert stack.title and callable(stack.build), stack.name
            assert set(stack.default_on) <= {"cpu", "cuda"}, stack.name
            if stack.fp8_twin:   # an fp8 stack is compared with a bf16 stack of the same table
                twin = stack_named(stacks, stack.fp8_twin)
                assert twin is not None and not twin.fp8_twin and "fp8" in stack.name, stack.name
            if stack.gpu_only:   # the row on a CPU says why
                assert "GPU" in stack.gpu_only, stack.name


def test_the_forced_schedule_skips_every_second_step_before_95_percent():
    assert STEP_CACHE_2["interval"] == 2 and forced_skips(20) == 9 and forced_skips(4) == 2


def test_every_unet_stack_builds_here_or_says_why(pack, tiny_sd15):
    built = 0
    for stack in UNET_STACKS:
        ok, reason = stack_availability(stack, cuda=False)
        if stack.gpu_only:
            assert (ok, reason) == (False, stack.gpu_only), stack.name
            continue
        if not ok:   # an optional library missing here (stable-fast, onediff, tensorrt): the reason names it
            assert stack.requires and reason.split(":")[0] in stack.requires, (stack.name, reason)
            continue
        if stack.name == "fp8":   # ComfyUI's UNETLoader recognises small-sd15 and up, not tiny-sd15: the fp8
            continue              # loader path is built in test_torch_compile's UNETLoader fp8 test
        model = stack.build(tiny_sd15, {"store": None})
        assert (model is tiny_sd15) == (stack.name == "eager"), stack.name   # the others patch a clone
        built += 1
    assert built >= 6


def test_every_dit_stack_builds_here_or_says_why(pack):
    from tools import bench_dit
    from tools.dit_factory import build_dit

    base = build_dit("tiny-flux-dev")
    assert set(bench_dit.STACKS) == {stack.name for stack in DIT_STACKS}
    for stack in DIT_STACKS:
        if stack.gpu_only:
            assert bench_dit.GPU_ONLY[stack.name] == stack.gpu_only
            continue
        model = stack.build(base, {"easycache_threshold": 0.2})
        assert (model is base) == (stack.name == "eager"), stack.name


def test_the_gpu_runs_name_stacks_the_benches_know():
    """tools/gpu_runs.sh's stack lists (its defaults of --stacks and SC_STACKS) name stacks of the tables."""
    script = (REPO_ROOT / "tools" / "gpu_runs.sh").read_text()
    known = {stack.name for stack in UNET_STACKS} | {stack.name for stack in DIT_STACKS}
    lists = re.findall(r'(?:--stacks\s+"?\$\{\w+:-|--stacks\s+|_STACKS:-)([\w+.,-]+)', script)
    assert len(lists) >= 6, lists
    for names in lists:
        assert set(names.split(",")) <= known, names
