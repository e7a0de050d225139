#!/usr/bin/env bash
# Install what the tests need and run them, offline (no GPU, no Hugging Face Hub).
#   bash tests/run.sh            every test, then the 15 slowest
#   bash tests/run.sh --fast     the fast tier: in-process tests and one end-to-end stop-and-resume (~2 min)
#   bash tests/run.sh [--fast] [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(--durations=15)
if [ "${1:-}" = --fast ]; then
  shift
  tier=(-m "not slow")
fi
# Keep a PyTorch that is already installed (e.g. your CUDA build); else take the CPU build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"  # the package itself (the whisper-ft command), the export runtimes, pytest
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider "${tier[@]}" tests "$@"
