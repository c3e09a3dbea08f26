#!/usr/bin/env bash
# Builds Stable Fast (PyPI `stable-fast==1.0.5`, sources only) for the torch of this Python, where no wheel fits:
# stable-fast publishes none; `stable-fast-pruna` wheels need torch 2.9 (pip install "stable-fast-pruna==1.0.8"
# there instead of this). Idempotent: a build that matches this torch, CUDA, arch list and patch is kept.
#
#   tools/build_stable_fast.sh fetch   # download the sdist (pip), check its sha256, keep a pruned copy (1.5 MB)
#   tools/build_stable_fast.sh         # fetch if needed, then build into $SFAST_BUILD_DIR/site
#   tools/build_stable_fast.sh --into-env   # ... into this Python's environment instead (a ComfyUI venv)
# then: export PYTHONPATH=$SFAST_BUILD_DIR/site:$PYTHONPATH (the script prints it).
#
# What it does to the sources (nothing of them is kept in this repository):
# - prunes the bundled cutlass to what setup.py compiles against (include/, tools/util/include/,
#   examples/45_dual_gemm/): 21 MB → 1.5 MB, small enough to carry to a machine without internet;
# - applies our patch for torch ≥ 2.10 (tools/patch_stable_fast.py: two C++ API changes);
# - sets CUDNN_HOME to the cuDNN of the `nvidia-cudnn-*` wheel torch uses (setup.py looks for it through
#   `nvidia.cudnn.__file__`, None for that namespace package) unless CUDNN_HOME is set.
# Environment: PYTHON (python3), SFAST_BUILD_DIR (<repo>/.sfast_build, git-ignored), TORCH_CUDA_ARCH_LIST (9.0:
# H100/H200; 8.9 Ada, 8.6 Ampere, ... semicolon-separated), MAX_JOBS (the core count), WITH_CUDA=0 for a CPU-only
# build (TorchScript passes only; ≈6 min on 2 cores). On a GPU box with 16 cores the CUDA build takes ≈2 min.
set -euo pipefail
version=1.0.5
sha256=f96c667c0f1517fb0ce9f73db48650a16db65b6219f0cb9d89a58abaa0587401   # stable-fast-1.0.5.tar.gz on PyPI
here=$(cd "$(dirname "$0")" && pwd)
build_dir=${SFAST_BUILD_DIR:-$(dirname "$here")/.sfast_build}
python=${PYTHON:-python3}
pruned=$build_dir/dl/stable-fast-$version-pruned.tar.gz
target=$build_dir/site
into_env=0
what=build
for arg in "$@"; do
  case "$arg" in
    fetch) what=fetch ;;
    --into-env) into_env=1 ;;
    *) echo "usage: $0 [fetch] [--into-env]" >&2; exit 2 ;;
  esac
done

fetch() {
  [ -f "$pruned" ] && return 0
  local dl=$build_dir/dl tmp
  mkdir -p "$dl"
  tmp=$(mktemp -d)
  # pip prepares the sdist's metadata, and its setup.py imports torch and wants CUDA unless WITH_CUDA=0
  echo "[sfast] downloading stable-fast==$version (sdist, 21 MB)"
  WITH_CUDA=0 "$python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$tmp" "stable-fast==$version"
  echo "$sha256  $tmp/stable-fast-$version.tar.gz" | sha256sum -c --quiet -
  tar xzf "$tmp/stable-fast-$version.tar.gz" -C "$tmp"
  local src=stable-fast-$version
  ( cd "$tmp" && tar czf "$pruned.part" \
      $src/{LICENSE,MANIFEST.in,PKG-INFO,README.md,requirements.txt,setup.cfg,setup.py,version.txt,src} \
      $src/third_party/cutlass/{LICENSE.txt,include,tools/util/include,examples/45_dual_gemm} )
  mv "$pruned.part" "$pruned"
  rm -rf "$tmp"
  echo "[sfast] kept $(du -h "$pruned" | cut -f1) in $pruned"
}

fetch
[ "$what" = fetch ] && exit 0

with_cuda=${WITH_CUDA:-1}
if [ "$with_cuda" != 0 ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  if [ -z "${CUDNN_HOME:-}" ]; then
    CUDNN_HOME=$("$python" - <<'PY'
import glob, os
import nvidia  # the namespace package of NVIDIA's wheels (nvidia-cudnn-cu12 / -cu13)
found = [os.path.dirname(os.path.dirname(h)) for p in nvidia.__path__
         for h in glob.glob(os.path.join(p, "**", "include", "cudnn.h"), recursive=True)]
print(found[0] if found else "")
PY
) || CUDNN_HOME=""
    [ -n "$CUDNN_HOME" ] && export CUDNN_HOME || echo "[sfast] no cuDNN headers in the nvidia wheels: set CUDNN_HOME" >&2
  fi
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
patch_id=$(cat "$here/patch_stable_fast.py" | sha256sum | cut -c1-12)
stamp="stable-fast $version patch $patch_id WITH_CUDA=$with_cuda arch ${TORCH_CUDA_ARCH_LIST:-} $("$python" -c \
  'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
if [ "$into_env" = 0 ] && [ "$(cat "$target/.stamp" 2>/dev/null)" = "$stamp" ] && ls "$target"/sfast/_C*.so >/dev/null 2>&1; then
  echo "[sfast] already built for this environment ($stamp): $target"
else
  src=$build_dir/src
  rm -rf "$src" && mkdir -p "$src"
  tar xzf "$pruned" -C "$src"
  "$python" "$here/patch_stable_fast.py" "$src/stable-fast-$version"
  echo "[sfast] building: $stamp, MAX_JOBS=$MAX_JOBS${CUDNN_HOME:+, CUDNN_HOME=$CUDNN_HOME}"
  started=$SECONDS
  where=(--target "$target" --upgrade)
  [ "$into_env" = 1 ] && where=()
  [ "$into_env" = 0 ] && rm -rf "$target"
  WITH_CUDA=$with_cuda "$python" -m pip install --no-index --no-build-isolation --no-deps --no-compile \
    "${where[@]}" "$src/stable-fast-$version"
  [ "$into_env" = 0 ] && echo "$stamp" > "$target/.stamp"
  echo "[sfast] built in $((SECONDS - started)) s"
fi
if [ "$into_env" = 0 ]; then
  PYTHONPATH=$target${PYTHONPATH:+:$PYTHONPATH} "$python" -c 'import sfast, sfast._C; print("[sfast] imports:", sfast.__version__, sfast.__file__)'
  echo "export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"
else
  "$python" -c 'import sfast, sfast._C; print("[sfast] imports:", sfast.__version__, sfast.__file__)'
fi
