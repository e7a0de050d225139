#!/usr/bin/env bash
# Install whisper-ft and fine-tune a Whisper on the bundled clips, printing its WER before and after.
#   bash demo/run.sh                  the real openai/whisper-tiny.en when the Hugging Face Hub is reachable,
#                                     else a tiny random Whisper built on the spot (offline, no GPU needed)
#   DEMO_MODEL=DIR bash demo/run.sh   a Whisper model folder of your own (or a Hub id)
#   SKIP_INSTALL=1 bash demo/run.sh   reuse the current environment
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIP_INSTALL:-}" ]; then
  # Keep a PyTorch that is already installed (e.g. your CUDA build); else take the CPU build.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e .
fi
rm -rf demo-run
model="${DEMO_MODEL:-}"
if [ -z "$model" ] && [ -z "${HF_HUB_OFFLINE:-}" ] && timeout 300 python - >/dev/null 2>&1 <<'PY'
from huggingface_hub import snapshot_download
snapshot_download("openai/whisper-tiny.en", allow_patterns=["*.json", "*.safetensors", "*.txt"])
PY
then
  model=openai/whisper-tiny.en
fi
device=()
python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || device=(-g cpu)
if [ -n "$model" ]; then
  echo "demo: fine-tuning $model on the bundled clips (demo/my-recordings.yaml)"
  python train_loop.py --config demo/my-recordings.yaml -wp "$model" --checkpoint-dir demo-run/output \
    ${device[@]+"${device[@]}"} "$@"
else
  echo "demo: the Hugging Face Hub is not reachable: fine-tuning a tiny random Whisper built offline instead"
  python -m whisper_ft.tiny demo-run/model --texts-from tests/data/cv-en/validated.tsv
  python train_loop.py --config demo/demo.yaml ${device[@]+"${device[@]}"} "$@"
fi
python - <<'PY'
import json
rows = [json.loads(l) for l in open("demo-run/output/metrics.jsonl")]
evals = [r for r in rows if "eval_wer" in r]
merged = [r for r in evals if "merge_alpha" in r]  # merge_base's pick is what was exported
after, how = (merged[-1], f"exported, merged with the base at alpha {merged[-1]['merge_alpha']:g}") if merged else \
    (min(evals[1:], key=lambda r: r["eval_wer"]), "best step, exported")
print(f"demo: WER {evals[0]['eval_wer']:.1f}% at step {evals[0]['step']} -> {after['eval_wer']:.1f}% after "
      f"fine-tuning ({how}; metrics: demo-run/output/metrics.jsonl)")
PY
