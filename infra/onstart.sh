#!/bin/bash
# Runs on every container start of a Vast.ai instance (given to Vast as the onstart command):
# the first boot, a start after a stop, a host reboot, an interruptible box coming back.
# rsync makes downloads faster (without it abfleet falls back to SFTP). Once abfleet is set up
# on the box, its guardian starts again, and it restarts the workers of any unfinished run.
root="${ABFLEET_REMOTE_ROOT:-/workspace/abfleet}"
mkdir -p "$root"
# When this container started: the guardian meters the time before it at the disk's rate.
date +%s.%N > "$root/container-started"
# The study's server of a --storage head run (infra/postgres-head.sh made it), before the workers.
for data in "$root/postgres/data" "/var/lib/abfleet-postgres/$(printf '%s' "$root" | sha1sum | cut -c1-12)/data"; do
  if [ -s "$data/PG_VERSION" ]; then
    bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    runuser -u postgres -- "$bindir/pg_ctl" -D "$data" -l "$(dirname "$data")/postgres.log" -w start >/dev/null 2>&1 || true
  fi
done
if [ -x "$root/venv/bin/abfleet" ]; then
  setsid nohup "$root/venv/bin/abfleet" worker guard --root "$root" \
    >> "$root/guardian.out" 2>&1 < /dev/null &
fi
if ! command -v rsync >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync) >/dev/null 2>&1 || true
fi
