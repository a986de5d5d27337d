#!/bin/bash
# postgres-head.sh ROOT PORT: start PostgreSQL for a study shared by several boxes.
#   - the password arrives in ROOT/postgres-init-password (mode 0600, written by the controller)
#     and is deleted once the server has it; it never appears on a command line;
#   - network connections must use TLS (hostssl only), with a self-signed certificate that
#     workers verify (sslmode=verify-ca); passwords are checked with SCRAM;
#   - the server runs as the `postgres` user (it refuses to run as root).
# Prints one JSON line: {"port": PORT, "cert": "<path of the server certificate>"}.
set -euo pipefail
root=$1
port=$2
cd /
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# The server's folder must be reachable by the postgres user: ROOT/postgres when it is,
# otherwise a folder of this ROOT's own under /var/lib.
pgdir="$root/postgres"
mkdir -p "$pgdir"
chown postgres "$pgdir"
chmod 700 "$pgdir"
if ! as_pg test -w "$pgdir"; then
  pgdir="/var/lib/abfleet-postgres/$(printf '%s' "$root" | sha1sum | cut -c1-12)"
  mkdir -p "$pgdir"
  chown postgres "$pgdir"
  chmod 700 "$pgdir"
fi
data="$pgdir/data"
if [ ! -s "$data/PG_VERSION" ]; then
  [ -s "$root/postgres-init-password" ] || { echo "no password file at $root/postgres-init-password" >&2; exit 2; }
  pwfile="$pgdir/init-password"
  install -o postgres -m 600 "$root/postgres-init-password" "$pwfile"
  as_pg "$bindir/initdb" -D "$data" -U abfleet --pwfile="$pwfile" -A scram-sha-256 -E UTF8 --locale=C >/dev/null
  openssl req -new -x509 -days 3650 -nodes -subj "/CN=abfleet-study" \
    -keyout "$data/server.key" -out "$data/server.crt" >/dev/null 2>&1
  chown postgres "$data/server.key" "$data/server.crt"
  chmod 600 "$data/server.key"
  cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '*'
port = $port
unix_socket_directories = '$pgdir'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
max_connections = 200
password_encryption = 'scram-sha-256'
# Each trial commits ~40 small transactions. Without waiting for each WAL flush a crash of
# this server can lose the last fraction of a second of updates, never consistency; the
# heartbeats re-run any trial that loses its end.
synchronous_commit = off
CONF
  cat > "$data/pg_hba.conf" <<HBA
local   all  all                scram-sha-256
hostssl all  all  0.0.0.0/0     scram-sha-256
hostssl all  all  ::/0          scram-sha-256
HBA
  chown postgres "$data/postgresql.conf" "$data/pg_hba.conf"
  as_pg "$bindir/pg_ctl" -D "$data" -l "$pgdir/postgres.log" -w start >/dev/null
  PGPASSWORD=$(cat "$pwfile") as_pg "$bindir/createdb" -h "$pgdir" -p "$port" -U abfleet abfleet
  rm -f "$pwfile" "$root/postgres-init-password"
elif ! as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  as_pg "$bindir/pg_ctl" -D "$data" -l "$pgdir/postgres.log" -w start >/dev/null
fi
printf '{"port": %s, "cert": "%s"}\n' "$port" "$data/server.crt"
