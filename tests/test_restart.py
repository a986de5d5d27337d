"""A restart, or a resume on another box, proposes new points, and stays reproducible.

The same calls as a worker makes (open the storage, load the study, reseed, run trials), with a
scoring function in place of the model: what is under test is which points the study proposes.
"""

from __future__ import annotations

from pathlib import Path

from abfleet.core import search

N_LAYERS = 8


def _score(params) -> dict:
    return {"refusals": 1, "n_bad": 2, "kl": 0.1, "degenerate": 0, "seconds": 0.0}


def _run_until(db: Path, n_trials: int) -> None:
    """One worker process: load (or create) the study and run it up to n_trials."""
    settings = search.SearchSettings(n_trials=n_trials, seed=42, n_startup_trials=10)
    storage = search.open_storage(f"sqlite:///{db}", settings)
    study = search.create_or_load_study(
        storage, "s", "fp", search.make_sampler(settings, 0), allow_mismatch=True
    )
    search.reseed(study, settings, worker_index=0)
    search.run_trials(study, storage, n_trials, N_LAYERS, _score, lambda: False)


def _points(db: Path) -> list[tuple]:
    settings = search.SearchSettings(n_trials=0, seed=42, n_startup_trials=10)
    storage = search.open_storage(f"sqlite:///{db}", settings)
    study = search.create_or_load_study(storage, "s", "fp", search.make_sampler(settings))
    return [tuple(sorted(t.params.items())) for t in study.get_trials()]


def test_three_trials_stop_continue_to_six_gives_six_distinct_points_reproducibly(tmp_path):
    first = tmp_path / "a.db"
    _run_until(first, 3)
    _run_until(first, 6)  # a restart of the same run (or its resume elsewhere from a backup)
    points = _points(first)
    assert len(points) == 6 and len(set(points)) == 6

    again = tmp_path / "b.db"
    _run_until(again, 3)
    _run_until(again, 6)
    assert _points(again) == points
