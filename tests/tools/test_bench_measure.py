"""tools/bench_measure: a timed run that recompiled is told apart from the steady ones."""
import torch

from tools.bench_measure import recompiled_note, steady_median, timed_runs


def test_a_timed_run_during_which_torch_compile_recompiled_is_marked_and_left_out_of_the_median():
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    double(torch.ones(2))   # the first sample compiles, before the timed runs
    sizes = iter([2, 2, 3, 2])   # the third call's new shape fails the guards: a recompile
    times, steady, result = timed_runs(lambda: double(torch.ones(next(sizes))), 4, cuda=False)
    assert steady == [True, True, False, True]
    assert torch.equal(result, torch.full((2,), 2.0))
    assert steady_median([1.0, 1.2, 140.0, 1.1], steady) == 1.1
    row = {"runs": [1.0, 1.2, 140.0, 1.1], "recompiled_runs_s": [140.0]}
    assert recompiled_note(row) == " (1 timed run recompiled: 140.0 s; left out of the median)"


def test_when_every_timed_run_recompiled_the_median_is_of_all_and_says_so():
    assert steady_median([3.0, 5.0, 4.0], [False, False, False]) == 4.0
    row = {"times_s": [3.0, 5.0], "recompiled_runs_s": [3.0, 5.0]}
    assert recompiled_note(row) == " (2 timed runs recompiled: 3.0, 5.0 s; every run did: the median is of all)"
    assert recompiled_note({"runs": [1.0]}) == ""
