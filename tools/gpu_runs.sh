#!/usr/bin/env bash
# The measurements still owed to issue 4, each sized to one 10-minute call on a lent H100/H200 (the `device`
# tool), with ComfyUI and the missing wheels carried in .gpu_carry/ (../shared/gpu/make_carry.sh pytest pluggy
# iniconfig pytest-timeout). Results land in $OUT (or ./gpu_out), one log per run.
#
#   bash tools/gpu_runs.sh tests      # GPU tests: graphs, LoRA (also keep_weights_on_gpu), fp8 (≈6 min; GPU_TESTS=<pytest -k expression> narrows)
#   bash tools/gpu_runs.sh package    # the GPU package test: two processes, cold and warm (≈2 min)
#   bash tools/gpu_runs.sh kernels    # one UNet call, SD1.5 and SDXL: flash vs cuDNN attention (KERNEL_CONFIGS, KERNEL_MODELS)
#   bash tools/gpu_runs.sh warm       # cold vs warm process (the precompiled UNet, the default), SD1.5 (WARM_MODEL)
#   bash tools/gpu_runs.sh sd15       # bench SD1.5 side by side with eager and TorchCompileModel, LoRA switch
#   bash tools/gpu_runs.sh sdxl       # bench SDXL side by side, fp8
#   bash tools/gpu_runs.sh precompile # dynamo's AOT compile of the UNet: new-process load time (tools/probe_precompile)
#   bash tools/gpu_runs.sh dit        # issue 16: DiT graph test, FLUX.1-dev side by side (DIT_MODEL, DIT_STACKS)
#   bash tools/gpu_runs.sh dit-warm   # issue 16: a DiT cold then warm process, inductor+cudagraphs, 1024²
#   bash tools/gpu_runs.sh fp8        # issue 17: precision fp8 GPU test, FLUX.1-dev bf16 vs fp8 (DIT_MODEL, FP8_STACKS)
#   bash tools/gpu_runs.sh stepcache  # issue 18: Step Cache GPU tests, FLUX.1-dev step-cache stacks (SC_STACKS,
#                                     #   SC_EASYCACHE_SWEEP; SC_TESTS=0 SC_LIMIT=560: the bench alone); stepcache-wan: Wan 2.1 1.3B 480x832, 33 frames;
#                                     #   stepcache-sdxl: SDXL 1024² fastest stacks (DeepCache's and Step Cache's)
#   bash tools/gpu_runs.sh timeline   # issues 17/18: where a graphed Flux sample's time goes beyond its kernels (bf16,
#                                     #   fp8), the fp8 kernel split, the LoRA change with fp8 (PROFILE_PARTS, DIT_MODEL)
#   bash tools/gpu_runs.sh gemm       # issue 17: Flux's GEMM shapes, bf16 vs fp8 row-wise (tools.probe_fp8_gemm, ≈1 min)
# On a machine of two GPUs, two runs can go side by side, one per GPU: CUDA_VISIBLE_DEVICES=1 bash tools/gpu_runs.sh ...
#   bash tools/gpu_runs.sh fp8-sdxl   # issue 17: SDXL 1024² bf16 vs fp8, compiled + graphs (a call of its own: fp8's
#                                     #   cold compile of the whole UNet took over 200 s)
set -u
runs="tests | package | kernels | warm | sd15 | sdxl | precompile | dit | dit-warm | fp8 | stepcache | stepcache-wan | stepcache-sdxl | timeline | gemm | fp8-sdxl"
what=${1:?"$runs"}
case "$what" in tests|package|kernels|warm|sd15|sdxl|precompile|dit|dit-warm|fp8|stepcache|stepcache-wan|stepcache-sdxl|timeline|gemm|fp8-sdxl) ;;
  *) echo "unknown run: $what ($runs)" >&2; exit 2 ;; esac
out=${OUT:-$PWD/gpu_out}
mkdir -p "$out"
if [ -d .gpu_carry/whl ]; then
  # once per machine: two runs started side by side (one per GPU) must not reinstall under each other's imports
  if [ ! -e /tmp/site/.carried ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_carry/whl/*.whl || exit 1
    touch /tmp/site/.carried
  fi
  export PYTHONPATH=/tmp/site:$PWD/.gpu_carry/ComfyUI:$PWD COMFYUI_PATH=$PWD/.gpu_carry/ComfyUI
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
fresh() { mktemp -d "/tmp/accel-$1-XXXX"; }

case "$what" in
  fp8)
    TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout "${FP8_TEST_LIMIT:-230}" python3 -m pytest -q -p no:cacheprovider \
      -s --timeout "${FP8_TEST_LIMIT:-230}" --tb=short -rfEs tests/accelerators/test_fp8_gpu.py > "$out/fp8-tests.log" 2>&1
    grep "^E \|passed\|failed\|SKIPPED\|FAILED\|relative error" "$out/fp8-tests.log" | tail -20
    timeout 330 python3 -m tools.bench_dit --model "${DIT_MODEL:-flux-dev}" --steps "${DIT_STEPS:-20}" --runs 2 \
      --stacks "${FP8_STACKS:-eager,inductor+cudagraphs,fp8+inductor+cudagraphs}" --out "$out/fp8-bench.json" \
      > "$out/fp8-bench.log" 2>&1
    grep "^\[bench_dit\]" "$out/fp8-bench.log" | tail -12 ;;
  timeline)
    TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout "${PROFILE_LIMIT:-400}" python3 -m tools.profile_dit \
      --model "${DIT_MODEL:-flux-dev}" --parts "${PROFILE_PARTS:-timeline,kernels}" --precision auto+fp8 \
      --lora-keep true > "$out/timeline.log" 2>&1
    grep "^\[timeline\]\|^\[kernels\]\|^\[lora\]\|Error" "$out/timeline.log" | tail -12 ;;
  gemm)
    timeout 300 python3 -m tools.probe_fp8_gemm > "$out/gemm.log" 2>&1
    grep "^\[gemm\]\|Error" "$out/gemm.log" | tail -12 ;;
  fp8-sdxl)
    COMFY_ACCEL_CACHE=$(fresh cache) TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 570 python3 -m tools.bench \
      --model sdxl --stacks inductor+cudagraphs,fp8+inductor+cudagraphs --runs 3 --out "$out/fp8-sdxl" \
      2>&1 | tee "$out/fp8-sdxl.log" | grep "^|\|\[bench\]" | tail -20 ;;
  dit)
    TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 150 python3 -m pytest -q -p no:cacheprovider -s --timeout 140 \
      --tb=short -rfEs -k "gpu" tests/accelerators/test_compile_dit.py > "$out/dit-tests.log" 2>&1
    grep "^E \|passed\|failed\|SKIPPED\|FAILED" "$out/dit-tests.log" | tail -20
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 timeout 400 python3 -m tools.bench_dit --model "${DIT_MODEL:-flux-dev}" \
      --steps "${DIT_STEPS:-20}" --runs 2 --stacks "${DIT_STACKS:-eager,inductor,inductor+cudagraphs}" \
      --out "$out/dit-bench.json" > "$out/dit-bench.log" 2>&1
    grep "^\[bench_dit\]" "$out/dit-bench.log" | tail -12 ;;
  dit-warm)
    store=$(fresh store)
    for run in cold warm; do
      TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 280 python3 tests/accelerators/compile_worker.py "$store" \
        "$out/dit-latent-$run.pt" inductor+cudagraphs "${DIT_MODEL:-flux-dev}" 128 "${DIT_STEPS:-20}" > "$out/dit-warm-$run.log" 2>&1
      echo "[$run] $(grep '^RESULT' "$out/dit-warm-$run.log" | cut -c1-700)"
    done ;;
  tests|package)
    # a per-test limit, so that one slow test fails with its traceback instead of the call's limit killing
    # pytest before its summary (what happened to the first GPU run of this file)
    if [ "$what" = tests ]; then select=(-k "${GPU_TESTS:-not package}"); else select=(-k package); fi
    TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 580 python3 -m pytest -q -p no:cacheprovider -s --timeout 240 \
      --tb=short -rfEs "${select[@]}" tests/accelerators/test_compile_gpu.py > "$out/$what.log" 2>&1
    grep -v "^WARNING\|Warning\|warn(" "$out/$what.log" | grep "^E \|passed\|failed\|SKIPPED\|FAILED\|cold:" \
      | tail -40 ;;
  kernels)
    # SD1.5 then SDXL: flash attention (inductor's choice) vs cuDNN's attention preferred
    for model in ${KERNEL_MODELS:-sd15 sdxl}; do
      limit=250; [ "$model" = sdxl ] && limit=320
      TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout $limit python3 -m tools.profile_unet "$model" \
        --configs "${KERNEL_CONFIGS:-default+cl,default+cl+cudnn}" --profile > "$out/kernels-$model.log" 2>&1
      grep -h "^eager\|^inductor\|^NVIDIA\|Error" "$out/kernels-$model.log"
    done ;;
  warm)
    # cold, then warm: as shipped (the compiler's modules imported in the background from the pack's import),
    # without that background import, and (WARM_TAGS=... warm-threads) with inductor's own compile-thread count
    # while the cached kernels load; a bytecode check first (the box's site-packages may hold no .pyc files)
    python3 -c "import sys, torch, pathlib; p = pathlib.Path(torch.__file__).parent / '_inductor' / '__pycache__'; \
print('[pyc] dont_write_bytecode', sys.dont_write_bytecode, '| torch/_inductor/__pycache__:', \
len(list(p.glob('*.pyc'))) if p.is_dir() else 'none')"
    store=$(fresh store)
    for tag in ${WARM_TAGS:-cold warm warm-no-preimport}; do
      threads=1; [ $tag = warm-threads ] && threads=default
      preimport=1; [ $tag = warm-no-preimport ] && preimport=0
      extra=""; [ $tag != cold ] && extra="${WARM_ARGS:-}"   # e.g. --cprofile 40 for the warm processes
      COMFY_ACCEL_PREIMPORT=$preimport TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 280 \
        python3 -m tools.warm_restart --store "$store" $tag \
        --model "${WARM_MODEL:-sd15}" --load-threads $threads $extra 2>&1 | tee "$out/warm-$tag.log" \
        | grep "^\[$tag\]" | sed -n "1,${WARM_LINES:-20}p"   # sed reads on: no SIGPIPE
    done ;;
  sd15)
    COMFY_ACCEL_CACHE=$(fresh cache) TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 580 python3 -m tools.bench \
      --stacks eager,comfy-compile,inductor+cudagraphs+keep \
      --runs 5 --lora-switch --steps-sweep --out "$out/sd15" 2>&1 | tee "$out/sd15.log" | grep "^|\|\[bench\]" | tail -20 ;;
  sdxl)
    COMFY_ACCEL_CACHE=$(fresh cache) TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 580 python3 -m tools.bench \
      --model sdxl --stacks eager,inductor+cudagraphs,fp8+inductor+cudagraphs --runs 3 --out "$out/sdxl" \
      2>&1 | tee "$out/sdxl.log" | grep "^|\|\[bench\]" | tail -20 ;;
  precompile)
    # build in one process; load in new ones: compile-cache artifacts first, the builder's cache, an empty cache
    built=$(fresh ind); file=$(fresh pre)/unet.precompiled
    TORCHINDUCTOR_CACHE_DIR=$built timeout 300 python3 -m tools.probe_precompile save "$file" --model sd15 \
      --with-cache-artifacts > "$out/precompile-save.log" 2>&1
    TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 120 python3 -m tools.probe_precompile load "$file" --model sd15 \
      --with-cache-artifacts > "$out/precompile-load-artifacts.log" 2>&1
    TORCHINDUCTOR_CACHE_DIR=$built timeout 100 python3 -m tools.probe_precompile load "$file" --model sd15 \
      > "$out/precompile-load-warm.log" 2>&1
    TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 90 python3 -m tools.probe_precompile load "$file" --model sd15 \
      > "$out/precompile-load-empty.log" 2>&1
    grep -h "^\[precompile\]" "$out"/precompile-*.log ;;
  stepcache|stepcache-wan)
    # core's EasyCache at the threshold of the sweep (eager, one sample each) that skips as many steps as
    # step-cache-2; core's cold compile (65-79 s on Flux) needs most of a call: the default stacks fit one
    sc_stacks=${SC_STACKS:-eager,inductor+cudagraphs+step-cache-2,fp8+inductor+cudagraphs+step-cache-2,comfy-compile+easycache}
    if [ "$what" = stepcache ] && [ "${SC_TESTS:-1}" = 1 ]; then
      TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 150 python3 -m pytest -q -p no:cacheprovider -s --timeout 140 \
        --tb=short -rfEs -k "gpu" tests/accelerators/test_step_cache_graphs.py > "$out/stepcache-tests.log" 2>&1
      grep "^E \|passed\|failed\|SKIPPED\|FAILED" "$out/stepcache-tests.log" | tail -20
    fi
    if [ "$what" = stepcache ]; then
      model=(--model flux-dev); limit=${SC_LIMIT:-420}
    else
      model=(--model wan21-1.3b --width 832 --height 480 --frames 9); limit=570
    fi
    timeout $limit python3 -m tools.bench_dit "${model[@]}" --steps 20 --runs 2 --stacks "$sc_stacks" \
      --easycache-sweep "${SC_EASYCACHE_SWEEP:-1,2,4}" --out "$out/$what-bench.json" > "$out/$what-bench.log" 2>&1
    grep "^\[bench_dit\]" "$out/$what-bench.log" | tail -14 ;;
  stepcache-sdxl)
    COMFY_ACCEL_CACHE=$(fresh cache) TORCHINDUCTOR_CACHE_DIR=$(fresh ind) timeout 580 python3 -m tools.bench \
      --model sdxl --stacks eager,fastest+taesd,fastest-step-cache+taesd --decode --runs 3 --out "$out/sdxl-sc" \
      2>&1 | tee "$out/stepcache-sdxl.log" | grep "^|\|\[bench\]" | tail -20 ;;
esac
