#!/usr/bin/env bash
# Train in the background: survives logging out, logs to train.log, prints how to follow it.
#   bash launch.sh [GPU_ID] [extra train_loop.py flags]     e.g.  bash launch.sh 1 --max-steps 8000
# Rerun the same command after a crash or preemption: training resumes from the newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
gpu="${1:-0}"
[ $# -gt 0 ] && shift
config="${CONFIG:-config.yaml}"
log="${LOG:-train.log}"
nohup accelerate launch --num_processes 1 --gpu_ids "$gpu" train_loop.py --config "$config" "$@" >>"$log" 2>&1 &
pid=$!
echo "$pid" > train.pid
echo "started training on GPU $gpu as PID $pid (config $config), logging to $log"
echo "follow it:  tail -f $log        stop it (saves a checkpoint first):  kill $pid"
