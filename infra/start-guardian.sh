#!/bin/bash
# start-guardian.sh ROOT: start the box's guardian (abfleet worker guard) detached, unless one
# already runs (its lock file keeps it to one per box). It ends the box's bill once the work of
# every run on it is over. Prints nothing; its log is ROOT/guardian.log.
set -uo pipefail
root=$1
[ -x "$root/venv/bin/abfleet" ] || exit 0
cd "$root"
setsid nohup "$root/venv/bin/abfleet" worker guard --root "$root" \
  >> "$root/guardian.out" 2>&1 < /dev/null &
exit 0
