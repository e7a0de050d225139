#!/usr/bin/env bash
# Install whisper-ft and run the offline demo: build a tiny Whisper on the spot, fine-tune it on the
# bundled clips and print its WER before and after. No GPU and no Hugging Face Hub access needed.
#   bash demo/run.sh            (set SKIP_INSTALL=1 to reuse the current environment)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIP_INSTALL:-}" ]; then
  # Keep a PyTorch that is already installed (e.g. your CUDA build); else take the CPU build.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -r requirements.txt
fi
rm -rf demo-run
python -m whisper_ft.tiny demo-run/model --texts-from tests/data/cv-en/validated.tsv
python train_loop.py --config demo/demo.yaml "$@"
python - <<'PY'
import json
rows = [json.loads(l) for l in open("demo-run/output/metrics.jsonl")]
evals = [r for r in rows if "eval_wer" in r]
print(f"demo: WER {evals[0]['eval_wer']:.1f}% at step {evals[0]['step']} -> "
      f"{min(r['eval_wer'] for r in evals[1:]):.1f}% best after fine-tuning (metrics: demo-run/output/metrics.jsonl)")
PY
