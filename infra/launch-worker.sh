#!/bin/bash
# launch-worker.sh ROOT RUN INDEX GPUS [WORKER ARGS]: start worker INDEX of the run in folder RUN,
# detached from the SSH session (setsid nohup, stdin from /dev/null), logging to
# RUN/worker-INDEX.out. Secrets come from RUN/.env (mode 0600), never from the command line.
# GPUS, when not empty, becomes CUDA_VISIBLE_DEVICES. Prints the worker's pid. The way it was
# started is kept in RUN/worker-INDEX.launch, for the box's guardian to start it again.
set -euo pipefail
root=$1
run=$2
index=$3
gpus=$4
shift 4
cd "$run"
if [ -f .env ]; then
  set -a
  . ./.env
  set +a
fi
if [ -n "$gpus" ]; then
  export CUDA_VISIBLE_DEVICES="$gpus"
fi
{ printf '%s\n' "$gpus"; for arg in "$@"; do printf '%s\n' "$arg"; done; } > "worker-$index.launch"
setsid nohup "$root/venv/bin/abfleet" worker run --run-dir "$run" --index "$index" "$@" \
  >> "worker-$index.out" 2>&1 < /dev/null &
pid=$!
printf '%s\n' "$pid" > "worker-$index.pid"
sleep 2
if ! kill -0 "$pid" 2>/dev/null; then
  echo "worker $index exited at once; the end of worker-$index.out:" >&2
  tail -n 5 "worker-$index.out" >&2
  exit 1
fi
printf '%s\n' "$pid"
