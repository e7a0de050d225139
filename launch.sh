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
# The trainer runs as `python train_loop.py -g GPU` (one process, as `accelerate launch --num_processes 1`
# would run it) and leads a new process group (setsid), so the printed kill reaches it, and its data workers,
# directly: no launcher stands between the signal and the save, and none kills it seconds later.
setsid nohup "${PYTHON:-python}" train_loop.py --config "$config" -g "$gpu" "$@" >>"$log" 2>&1 </dev/null &
pid=$!
# The process group exists once setsid has run in the child: wait for that (at most 2 s), so the kill printed
# below works at once (a script that ran it straight away found no group, and the run went on).
for _ in $(seq 100); do
  [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] && break
  sleep 0.02
done
echo "$pid" > "$(dirname "$log")/train.pid"
on=$([ "$gpu" = cpu ] && echo "the CPU" || echo "GPU $gpu")
echo "started training on $on as process group $pid (config $config), logging to $log"
echo "follow it:  tail -f $log"
echo "stop it (saves a checkpoint first):  kill -TERM -- -$pid"
