"""Comparing benchmark summaries in tests (imported as a test helper): nested JSON as flat
``{path: leaf}`` dicts, which ``pytest.approx`` can compare, and the results of a summary
without its measured training times."""

from __future__ import annotations

#: Summary entries that are measurements of the machine, not results: they differ between
#: two runs of the same cells.
TIMINGS = ("train_seconds_median",)


def flat(value: object, path: tuple = ()) -> dict[tuple, object]:
    """Nested dicts and lists as one flat ``{path: leaf}`` dict."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {path: value}
    return {k: v for key, item in items for k, v in flat(item, (*path, key)).items()}


def summary_results(summary: object) -> dict[tuple, object]:
    """:func:`flat` of ``summary`` without the :data:`TIMINGS` entries."""
    return {k: v for k, v in flat(summary).items() if not any(t in k for t in TIMINGS)}
