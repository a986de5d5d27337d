#!/bin/bash
# bootstrap.sh ROOT WHEEL: a venv in ROOT/venv that sees exactly the packages of the box's Python
# with torch (so its torch is reused, never replaced or downloaded again), with the shipped
# abfleet wheel installed. Prints `runtime: ...` (which Python and torch) and, last,
# `abfleet worker --version`. ROOT/venv/abfleet-runtime.txt keeps the runtime line.
set -euo pipefail
root=$1
wheel=$2
venv="$root/venv"
py=""
for candidate in "${ABFLEET_PYTHON:-}" /opt/conda/bin/python3 /usr/local/bin/python3 /usr/bin/python3 python3; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
    py=$(command -v "$candidate")
    break
  fi
done
if [ -z "$py" ]; then
  echo "no python with torch on this box: use an image with PyTorch (see config/defaults.toml)" >&2
  exit 3
fi

# What the chosen Python sees: its sys.path (site-packages of a venv, conda env or uv Python,
# .pth expansions, PYTHONPATH) and where its torch is. A venv made with --system-site-packages
# from a venv's Python would see the *base* interpreter's packages instead, and pip would then
# install a second torch (several GB of CUDA wheels).
chosen=$("$py" - <<'PY'
import json, os, sys
import torch
print(json.dumps({
    "python": sys.executable,
    "python_version": sys.version.split()[0],
    "prefix": sys.prefix,
    "paths": [p for p in sys.path if p and os.path.isdir(p)],
    "torch": torch.__version__,
    "torch_file": torch.__file__,
    "cuda": torch.version.cuda or "",
}))
PY
)
marker="$venv/abfleet-python.json"
if [ -d "$venv" ] && [ "$(cat "$marker" 2>/dev/null)" != "$chosen" ]; then
  # Another Python, its packages moved, or a venv of an older abfleet (which may hold a torch of
  # its own): a venv keeps its interpreter and paths, so start afresh.
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv --without-pip "$venv"
  # The venv's own site-packages stays first (abfleet and anything missing go there); the
  # chosen Python's paths follow through a .pth, so its torch is the one imported.
  CHOSEN=$chosen "$venv/bin/python" - <<'PY'
import json, os, sys, sysconfig
own = set(sys.path)
paths = [p for p in json.loads(os.environ["CHOSEN"])["paths"] if p not in own]
with open(os.path.join(sysconfig.get_path("purelib"), "abfleet-box-python.pth"), "w") as f:
    f.write("".join(p + "\n" for p in paths))
PY
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    "$venv/bin/python" -m ensurepip --default-pip >/dev/null
  fi
  printf '%s' "$chosen" > "$marker"
fi
seen=$("$venv/bin/python" -c 'import torch; print(torch.__file__)' 2>/dev/null || echo "nowhere (import failed)")
want=$(CHOSEN=$chosen "$venv/bin/python" -c 'import json, os; print(json.loads(os.environ["CHOSEN"])["torch_file"])')
if [ "$seen" != "$want" ]; then
  echo "the abfleet venv would import torch from $seen, not the $py torch at $want: remove $venv and retry" >&2
  exit 3
fi

# torch is pinned to the one already here: pip may add what is missing but never replaces it.
torch_version=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')
constraints="$venv/abfleet-constraints.txt"
printf 'torch==%s\n' "$torch_version" > "$constraints"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints")
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
  if ! "${pip[@]}" "$wheel"; then
    echo "installing abfleet's dependencies failed (torch stays pinned at $torch_version, which abfleet needs to be >= 2.4)" >&2
    exit 1
  fi
fi
runtime=$(CHOSEN=$chosen "$venv/bin/python" - <<'PY'
import json, os
c = json.loads(os.environ["CHOSEN"])
build = "CUDA " + c["cuda"] if c["cuda"] else "CPU build"
where = os.path.dirname(os.path.dirname(c["torch_file"]))
print(f"runtime: python {c['python']} ({c['python_version']}), torch {c['torch']} ({build}) from {where}")
PY
)
printf '%s\n' "$runtime" > "$venv/abfleet-runtime.txt"
printf '%s\n' "$runtime"
"$venv/bin/abfleet" worker --version
