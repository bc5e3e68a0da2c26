#!/usr/bin/env bash
# N local JAX processes training one model together over gloo CPU collectives (what CI and the tests use).
#
#   launch/local_multiprocess.sh N --config configs/synthetic.py --workdir runs/mp [--config.x=y ...]
#
# Each process gets its own CPU device(s) (XLA_FLAGS may force several per process), joins the coordinator at
# localhost:$PORT, loads only its slice of every global batch, and process 0 writes the logs and results.
# Exits non-zero if any process fails; logs go to $LOG_DIR/process_<i>.log (default: a temporary directory).
set -euo pipefail

if [[ $# -lt 1 ]] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [alignmamba_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-.venv/bin/python}
log_dir=${LOG_DIR:-$(mktemp -d)}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  "$python" -m alignmamba_jax.main "$@" --coordinator_address="localhost:$port" \
    --num_processes="$num_processes" --process_id="$i" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log ($log_dir/process_$i.log) ends with:" >&2
    tail -n 30 "$log_dir/process_$i.log" >&2
    status=1
  fi
done
if [[ $status -eq 0 ]]; then
  cat "$log_dir/process_0.log"
else
  cleanup
fi
exit $status
