#!/bin/bash
# bootstrap.sh ROOT WHEEL: a venv in ROOT/venv that reuses the image's torch (so no CUDA wheels
# are downloaded), with the shipped abfleet wheel installed; prints `abfleet worker --version`.
set -euo pipefail
root=$1
wheel=$2
py=""
for candidate in "${ABFLEET_PYTHON:-}" /opt/conda/bin/python3 /usr/local/bin/python3 /usr/bin/python3 python3; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  echo "no python with torch on this box: use an image with PyTorch (see config/defaults.toml)" >&2
  exit 3
fi
if [ ! -x "$root/venv/bin/python" ]; then
  "$py" -m venv --system-site-packages "$root/venv"
fi
# Same version number with new code must still replace the old install: force abfleet itself,
# then let pip add only the dependencies that are missing.
"$root/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel"
"$root/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
"$root/venv/bin/abfleet" worker --version
