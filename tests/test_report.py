"""The run report: written beside the export by the worker, rebuilt by `abfleet report`, and
drawn by a real headless Chromium (its DOM after the scripts ran, and a screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abfleet.job import manifest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: tests/run installs it (apt-get install chromium)")
    return found


def _browser(page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must not need it
            *flags,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_export_carries_a_report_that_a_browser_draws(finished_run):
    run, result = finished_run
    page = run.model_dir / "report.html"
    entries = manifest.read(run.model_dir)
    assert "report.html" in {e.path for e in entries}  # downloaded and verified with the model
    text = page.read_text()
    # Self-contained: no script or stylesheet is loaded from anywhere (plotly.js is inline;
    # the browser below also runs with every host name unresolvable).
    assert not re.search(r"<(script|link)[^>]+(src|href)=", text)
    assert f"chosen (trial {result.chosen['trial']})" in text

    dom = _browser(page, "--virtual-time-budget=10000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # plotly draws each chart as SVG once its script has run: none means an empty page or a
    # script error. Four charts: the trade-off, the capability check (before/after per lm-eval
    # task), the trials over time, the weights per layer.
    assert dom.stdout.count('class="main-svg"') >= 4
    assert 'id="capability"' in dom.stdout and "abfleet_capitals (acc, n=12)" in dom.stdout
    assert dom.stdout.count('class="point"') >= 6  # every trial is a drawn point
    assert "Before / after" in dom.stdout and "refusals" in dom.stdout

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    taken = _browser(
        page, "--virtual-time-budget=10000", "--window-size=1200,2400", f"--screenshot={shot}"
    )
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]


def test_report_command_rebuilds_it_from_the_run_folder(finished_run, tmp_path):
    run, _ = finished_run
    out = tmp_path / "again.html"
    proc = subprocess.run(
        [sys.executable, "-m", "abfleet", "report", str(run.path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run.model_dir / "abfleet-run.json").read_text())
    text = out.read_text()
    assert f"chosen trial {record['chosen']['trial']}" in text and "plotly" in text.lower()

    bad = subprocess.run(
        [sys.executable, "-m", "abfleet", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "has no study.db" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
