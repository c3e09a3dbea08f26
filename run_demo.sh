#!/usr/bin/env bash
# Sets up (venv, pinned CPU torch or the machine's CUDA torch, the real ComfyUI) and runs the main job:
# the side-by-side benchmark, baseline vs accelerated, on a random-weight model. Extra args go to the bench.
set -euo pipefail
cd "$(dirname "$0")"
tools/setup_env.sh
exec .venv/bin/python -m tools.bench "$@"
