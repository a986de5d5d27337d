#!/bin/sh
# Print (and create) abfleet's folder on this box: $ABFLEET_REMOTE_ROOT if set, else
# /workspace/abfleet where /workspace is writable (Vast.ai images), else ~/abfleet.
set -eu
root="${ABFLEET_REMOTE_ROOT:-}"
if [ -z "$root" ]; then
  if [ -d /workspace ] && [ -w /workspace ]; then root=/workspace/abfleet; else root="$HOME/abfleet"; fi
fi
mkdir -p "$root/runs" "$root/wheels"
printf '%s\n' "$root"
