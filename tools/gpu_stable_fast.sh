#!/usr/bin/env bash
# Issue 20's GPU run, one call of the `device` tool each (< 10 min), from a copy of this worktree with
# .gpu_carry/ (ComfyUI + wheels) beside it and the pruned stable-fast sdist in .sfast_build/dl/ (made here by
# `tools/build_stable_fast.sh fetch`: the GPU box has no internet). Logs and bench JSON land in $OUT.
#
#   bash tools/gpu_stable_fast.sh sd15   # build, GPU tests, xformers probe, bench SD1.5 512² side by side
#   bash tools/gpu_stable_fast.sh sdxl   # build (skipped if this machine built it already), GPU tests, bench SDXL
#                                        # 1024² (≈8.5 min in all on an H200; GPU_TESTS=0 skips the tests)
# The build goes to /tmp/sfast_build (outside the carried tree): a machine kept warm between calls reuses it.
set -u
what=${1:?"sd15 | sdxl"}
out=${OUT:-$PWD/gpu_out}
mkdir -p "$out"
carry=${GPU_CARRY:-../.gpu_carry}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carry"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(cd "$carry" && pwd)/ComfyUI:$PWD PYTHONUNBUFFERED=1
export COMFYUI_PATH=$(cd "$carry" && pwd)/ComfyUI
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
fresh() { mktemp -d "/tmp/accel-$1-XXXX"; }

export SFAST_BUILD_DIR=/tmp/sfast_build
mkdir -p $SFAST_BUILD_DIR/dl
for f in .sfast_build/dl/*.tar.gz; do [ -f "$SFAST_BUILD_DIR/dl/${f##*/}" ] || cp "$f" $SFAST_BUILD_DIR/dl/; done
MAX_JOBS=$(nproc) timeout 400 bash tools/build_stable_fast.sh > "$out/build-$what.log" 2>&1
echo "build rc=$? $(grep -h '^\[sfast\]' "$out/build-$what.log" | tr '\n' ' ')"
export PYTHONPATH=$SFAST_BUILD_DIR/site:$PYTHONPATH

bench() {   # model, runs, stacks
  COMFY_ACCEL_CACHE=$(fresh cache) TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout ${BENCH_LIMIT:-400} \
    python3 -m tools.bench --model "$1" --runs "$2" --stacks "$3" --out /tmp/bench-$1 > "$out/bench-$1.log" 2>&1
  echo "bench $1 rc=$?"
  grep -h "^|\|\[bench\]" "$out/bench-$1.log" | tail -24
  cp /tmp/bench-$1/*.json "$out/" 2>/dev/null
}

gpu_tests() {   # from a copy in a folder with a valid package name (pytest imports the repo's __init__.py)
  [ "${GPU_TESTS:-1}" = 0 ] && return
  rm -rf /tmp/accel_pack && cp -r . /tmp/accel_pack
  (cd /tmp/accel_pack && TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout ${TESTS_LIMIT:-200} python3 -m pytest -q \
    -p no:cacheprovider -s --timeout 150 --tb=short -rfEs tests/accelerators/test_stable_fast_gpu.py \
    tests/accelerators/test_compile_adapters.py > "$out/tests.log" 2>&1)
  grep -v "Warning\|warn(" "$out/tests.log" | grep "^E \|passed\|failed\|SKIPPED\|FAILED\|vs eager\|LoRA" | tail -30
}

case "$what" in
  sd15)
    gpu_tests
    # xformers 0.0.35 (declares torch>=2.10, links libcudart.so.12: the cu12 runtime wheel beside it) in its own
    # folder, so that the bench below runs without it: does it load, and does ComfyUI pick it for attention?
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/xf .sfast_build/xformers/*.whl
    LD_LIBRARY_PATH=/tmp/xf/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-} PYTHONPATH=/tmp/xf:$PYTHONPATH \
      timeout 120 python3 -m tools.probe_xformers > "$out/xformers.log" 2>&1
    echo "xformers probe rc=$?"; grep "^\[xformers\]" "$out/xformers.log"
    bench sd15 5 eager,comfy-compile,inductor+cudagraphs,stable-fast,stable-fast-max ;;
  sdxl)
    gpu_tests
    COMFY_ACCEL_PRECOMPILE=0 bench sdxl 3 ${SDXL_STACKS:-eager,comfy-compile,inductor+cudagraphs,stable-fast,stable-fast-max} ;;
  *) echo "unknown run: $what (sd15 | sdxl)" >&2; exit 2 ;;
esac
