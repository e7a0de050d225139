#!/usr/bin/env bash
# Install what the tests need and run them, offline (no GPU, no Hugging Face Hub).
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep a PyTorch that is already installed (e.g. your CUDA build); else take the CPU build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-dev.txt
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider tests "$@"
