#!/usr/bin/env bash
# The GPU figures and checks that still need a GPU, as one script for a GPU machine lent for a few
# minutes. Each part has its own time limit, so a slow one cannot starve the rest; results go to $OUT.
#   OUT=gpu-results bash bench/gpu_checks.sh [part ...]
# Parts, in the default order (most wanted first), with their limits:
#   profile    where a compiled batch-32 step's time goes (bench/profile_loop.py), and each
#              attention backend timed on its shapes (bench/bench_attention.py): the evidence the
#              2.0x target needs before anything else is changed                                    230 s
#   guide      the guide's settings (fp16, batch 16, checkpointing) against the Trainer          200 s
#   tests      tests/test_gpu.py: FSDP and DeepSpeed ZeRO-2/3 at world size 1, the queued step's
#              read-backs on CUDA, the compiled greedy step against generate() in fp32              300 s
#   lora       large-v3 shape, full against LoRA, both compiled (torch_compile auto)             300 s
#   eval_fp32  evaluation against predict_with_generate in fp32 (identical transcripts)          150 s
#   batch32    the shipped settings (bf16, batch 32, no checkpointing) against the Trainer        240 s
#   memtable   peak memory of small, medium, large-v3 x checkpointing false/encoder/true           420 s
# One device call may run 600 s and a session gets about 900 s of device time, start-up included: pass two or
# three parts per call (e.g. "profile guide", then "tests lora").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
for part in ${*:-profile guide tests lora eval_fp32 batch32 memtable}; do
  start=$SECONDS
  case $part in
    guide) timeout 200 python bench/bench_gpu.py --guide --skip ceiling eval --steps 30 --log-every 10 \
             --json "$OUT/guide.json" > /dev/null 2> "$OUT/guide.log" ;;
    profile) timeout 200 python bench/bench_gpu.py --skip trainer ceiling eval --steps 20 --log-every 10 \
             --profile "$OUT/profile" --json "$OUT/profile-bench.json" > /dev/null 2> "$OUT/profile.log"
             timeout 30 python bench/bench_attention.py --json "$OUT/attention.json" > "$OUT/attention.md" 2>&1 ;;
    tests) timeout 300 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/tests.log" 2>&1 ;;
    eval_fp32) timeout 150 python bench/bench_gpu.py --skip train trainer ceiling --eval-samples 64 \
             --precision fp32 --json "$OUT/eval_fp32.json" > /dev/null 2> "$OUT/eval_fp32.log" ;;
    lora) timeout 300 python bench/bench_memory.py --modes full lora --steps 10 > "$OUT/lora.md" 2> "$OUT/lora.log" ;;
    batch32) timeout 240 python bench/bench_gpu.py --skip ceiling eval --steps 40 --log-every 10 \
             --json "$OUT/batch32.json" > /dev/null 2> "$OUT/batch32.log" ;;
    memtable) timeout 420 python bench/bench_gpu.py --memory-table --torch-compile false --memory-steps 6 \
             --json "$OUT/memtable.json" > /dev/null 2> "$OUT/memtable.log" ;;
    *) echo "unknown part: $part (guide profile tests lora eval_fp32 batch32 memtable)" >&2; exit 2 ;;
  esac
  echo "$part: exit $?, $((SECONDS - start)) s" | tee -a "$OUT/parts.txt"
done
