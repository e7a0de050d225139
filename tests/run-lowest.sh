#!/usr/bin/env bash
# The fast tests against the lowest supported versions (requirements-lowest.txt), in their own environment
# (.venv-lowest), so that the floors in requirements.txt are facts, not hopes. CI runs it after tests/run.sh.
#   bash tests/run-lowest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-lowest/bin/python ] || python -m venv .venv-lowest
py=.venv-lowest/bin/python
$py -c "import torch" 2>/dev/null || $py -m pip install -q torch==2.13.0
$py -m pip install -q -c requirements-lowest.txt -e ".[dev]"
$py -c "import transformers, accelerate, datasets, peft; print('lowest versions: transformers', transformers.__version__, \
'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__)"
HF_HUB_OFFLINE=1 $py -m pytest -q -p no:cacheprovider -m "not slow" tests "$@"
