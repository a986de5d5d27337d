#!/bin/bash
# bootstrap.sh ROOT WHEEL: a venv in ROOT/venv that reuses the image's torch (so no CUDA wheels
# are downloaded), with the shipped abfleet wheel installed; prints `abfleet worker --version`.
set -euo pipefail
root=$1
wheel=$2
venv="$root/venv"
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
if [ ! -x "$venv/bin/python" ]; then
  # Without its own pip the venv is made in a fraction of the time; the image's pip, visible
  # through --system-site-packages, installs into it. Images without pip get one.
  "$py" -m venv --system-site-packages --without-pip "$venv"
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    "$venv/bin/python" -m ensurepip --default-pip >/dev/null
  fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# Same version number with new code must still replace the old install: force abfleet itself.
"${pip[@]}" --no-deps --force-reinstall "$wheel"
# Then let pip add the dependencies, unless every one is already satisfied (a fast check with
# the packaging library pip vendors, instead of a full resolve).
if ! "$venv/bin/python" - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, requires, version

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

for line in requires("abfleet") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if req.extras or not req.specifier.contains(have, prereleases=True):
        sys.exit(1)
PY
then
  "${pip[@]}" "$wheel"
fi
"$venv/bin/abfleet" worker --version
