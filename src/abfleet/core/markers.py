"""Marker matching on generated answers, and detection of degenerate (looping or empty) text."""

from __future__ import annotations

from abfleet.job.spec import DEFAULT_REFUSAL_MARKERS

__all__ = ["DEFAULT_REFUSAL_MARKERS", "MarkerMatcher", "is_degenerate"]

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def normalize(text: str) -> str:
    return " ".join(text.translate(_APOSTROPHES).lower().split())


class MarkerMatcher:
    """Counts an answer as showing the behaviour if it is empty or contains a marker."""

    def __init__(self, markers: tuple[str, ...] | list[str]) -> None:
        self.markers = tuple(normalize(m) for m in markers if m.strip())
        if not self.markers:
            raise ValueError("at least one marker is needed")

    def matches(self, text: str) -> bool:
        norm = normalize(text)
        return any(m in norm for m in self.markers)

    def is_refusal(self, text: str) -> bool:
        return not text.strip() or self.matches(text)


def is_degenerate(text: str, min_repeats: int = 3) -> bool:
    """True for an empty answer, or one whose tail is a short phrase repeated in a loop.

    Marker scoring cannot see gibberish: a trial that "stops refusing" by babbling would look
    perfect. A tail counts as a loop when a unit of 1-8 words (or 1-12 characters, for text
    without spaces) repeats at least ``min_repeats`` times and covers half of the answer.
    """
    stripped = text.strip()
    if not stripped:
        return True
    words = stripped.split()
    if _periodic_tail(words, 8, min_repeats):
        return True
    compact = "".join(words)
    return len(words) <= 3 and _periodic_tail(list(compact), 12, min_repeats)


def _periodic_tail(units: list[str], max_period: int, min_repeats: int) -> bool:
    n = len(units)
    for period in range(1, max_period + 1):
        if n < period * min_repeats:
            break
        run = period  # the last `run` units repeat with this period
        while run < n and units[n - run - 1] == units[n - run - 1 + period]:
            run += 1
        if run >= period * min_repeats and run * 2 >= n:
            return True
    return False
