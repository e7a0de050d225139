#!/usr/bin/env bash
# Train in the background: survives logging out, logs to train.log, prints how to follow it.
#   bash launch.sh [GPU_ID|cpu] [extra train_loop.py flags]     e.g.  bash launch.sh 1 --max-steps 8000
# CONFIG (default config.yaml) and LOG (default train.log; train.pid goes beside it) are read from the environment.
# Rerun the same command after a crash or preemption: training resumes from the newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
gpu="${1:-0}"
[ $# -gt 0 ] && shift
config="${CONFIG:-config.yaml}"
log="${LOG:-train.log}"
if [ "$gpu" = cpu ]; then  # bash launch.sh cpu: on the CPU on purpose (-g cpu hides the GPUs)
  where=(--cpu) train_flags=(-g cpu) on="the CPU"
else
  where=(--gpu_ids "$gpu") train_flags=() on="GPU $gpu"
fi
# setsid: the launcher and the training process share a new process group, so one signal to the group
# reaches the trainer itself (accelerate's launcher does not forward SIGTERM to it).
setsid nohup accelerate launch --num_processes 1 "${where[@]}" train_loop.py --config "$config" \
  ${train_flags[@]+"${train_flags[@]}"} "$@" >>"$log" 2>&1 </dev/null &
pid=$!
# The process group exists once setsid has run in the child: wait for that (at most 2 s), so the kill printed
# below works at once (a script that ran it straight away found no group, and the run went on).
for _ in $(seq 100); do
  [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] && break
  sleep 0.02
done
echo "$pid" > "$(dirname "$log")/train.pid"
echo "started training on $on as process group $pid (config $config), logging to $log"
echo "follow it:  tail -f $log"
echo "stop it (saves a checkpoint first):  kill -TERM -- -$pid"
