#!/bin/bash
# stop-workers.sh RUN SIGNAL: send SIGNAL (TERM: the worker ends within seconds, its running trial
# failed and re-queued for a resume; KILL: at once, the trial re-queued by its stale heartbeat)
# to every worker of the run in folder RUN. Prints the pids it signalled.
set -uo pipefail
run=$1
signal=$2
# The box's guardian restarts a worker that dies unfinished; not one the user stopped.
touch "$run/.stopped-by-user"
for pidfile in "$run"/worker-*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid" && printf '%s\n' "$pid"
  fi
done
exit 0
