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
# setsid: the launcher and the training process share a new process group, so one signal to the group
# reaches the trainer itself (accelerate's launcher does not forward SIGTERM to it).
setsid nohup accelerate launch --num_processes 1 --gpu_ids "$gpu" train_loop.py --config "$config" "$@" \
  >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" > train.pid
echo "started training on GPU $gpu as process group $pid (config $config), logging to $log"
echo "follow it:  tail -f $log"
echo "stop it (saves a checkpoint first):  kill -TERM -- -$pid"
