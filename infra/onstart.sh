#!/bin/bash
# Runs once when a Vast.ai instance boots (given to Vast as the onstart command).
# rsync makes downloads faster; without it abfleet falls back to SFTP.
mkdir -p /workspace/abfleet
if ! command -v rsync >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync) >/dev/null 2>&1 || true
fi
