#!/usr/bin/env bash
# The two stop tests (launch.sh's printed stop, and a SIGTERM to `accelerate launch` alone) N times in a row,
# stopping at the first failure: the stop must save every time, not most times.
#   bash bench/repeat_stop_tests.sh [N] [PYTHON]     default 20 runs with `python`;
#   bash bench/repeat_stop_tests.sh 20 .venv-lowest/bin/python   with the lowest accelerate (tests/run-lowest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
py=${2:-python}
log=$(mktemp /tmp/stop-run.XXXXXX.log)  # one per invocation: two Pythons can run side by side
$py -c "import accelerate; print('accelerate', accelerate.__version__)"
for i in $(seq 1 "$n"); do
  if ! HF_HUB_OFFLINE=1 $py -m pytest -q -p no:cacheprovider \
      "tests/test_robustness.py::test_launch_sh_on_the_cpu_stops_on_its_printed_command_and_the_same_command_resumes" \
      "tests/test_robustness.py::test_a_sigterm_to_accelerate_launch_alone_saves_and_the_run_resumes" > "$log" 2>&1; then
    tail -30 "$log"
    echo "run $i of $n failed (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    exit 1
  fi
  echo "run $i of $n: both passed (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
done
