#!/usr/bin/env bash
# Sets up (venv, pinned CPU torch, the real ComfyUI, Chromium) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
tools/setup_env.sh --browser
exec .venv/bin/python -m pytest -q -rs --durations=12 "$@"   # the slowest tests: the suite must stay well under 20 min
