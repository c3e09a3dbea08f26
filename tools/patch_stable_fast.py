"""Our patch to stable-fast 1.0.5's C++ sources for torch ≥ 2.10, applied at build time by build_stable_fast.sh.

Two torch API changes break its build (found by compiling it against torch 2.11+cu130, see HOST.md):
- `at::Context::alertCuBLASConfigNotDeterministic()` is gone: its calls only warned under deterministic mode,
  so they are removed;
- `allowFP16ReductionCuBLAS()` / `allowBF16ReductionCuBLAS()` return `at::CuBLASReductionOption` instead of
  `bool`: each call is wrapped in `sfast_allows_reduced_precision(...)`, which takes either type (true for a
  bool `true` or for `AllowReducedPrecisionWithSplitK`), so the patched sources build on older torch too.

Every edit must match at least once, else this exits non-zero naming the file (another stable-fast version needs
a look, not a silent half-patch). Running it twice changes nothing.

    python tools/patch_stable_fast.py <unpacked stable-fast source folder>
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

MARKER = "comfy-accel patch for torch >= 2.10"
HELPER = f"""// {MARKER}: the reduction-option getters return an enum there, a bool before
#include <type_traits>
static inline bool sfast_allows_reduced_precision(bool allowed) {{ return allowed; }}
template <typename Option, typename = typename std::enable_if<std::is_enum<Option>::value>::type>
static inline bool sfast_allows_reduced_precision(Option option) {{
  return option == Option::AllowReducedPrecisionWithSplitK;
}}
"""
ALERT = re.compile(r"^[ \t]*(?:at::)?globalContext\(\)\.alertCuBLASConfigNotDeterministic\(\);[ \t]*\n", re.M)
REDUCTION = re.compile(r"(at::globalContext\(\)\.allow(?:FP16|BF16)ReductionCuBLAS\(\))")
FILES = {  # file → the edits it needs
    "src/sfast/csrc/operators/cublas/CUDABlas.cc": ("alert", "reduction"),
    "src/sfast/csrc/operators/cutlass/cutlass_dual_linear_kernel.cu": ("reduction",),
}


def patch_text(text: str, edits: tuple) -> tuple[str, dict]:
    counts = {}
    if "alert" in edits:
        text, counts["alert"] = ALERT.subn("", text)
    if "reduction" in edits:
        text, counts["reduction"] = REDUCTION.subn(r"sfast_allows_reduced_precision(\1)", text)
        text = HELPER + text
    return text, counts


def main(source: str) -> int:
    root = Path(source)
    for relative, edits in FILES.items():
        path = root / relative
        text = path.read_text()
        if MARKER in text:
            print(f"[patch] {relative}: already patched")
            continue
        patched, counts = patch_text(text, edits)
        missing = [edit for edit, n in counts.items() if n == 0]
        if missing:
            print(f"[patch] {relative}: no match for {', '.join(missing)}: not the stable-fast 1.0.5 sources "
                  f"this patch was written for", file=sys.stderr)
            return 1
        path.write_text(patched)
        print(f"[patch] {relative}: " + ", ".join(f"{n} {edit} call(s)" for edit, n in counts.items()))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
