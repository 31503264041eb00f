"""The settings of the Bayesian methods chosen on validation data (never the test set)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from .cells import Cell
from .config import Preset

#: The settings of each Bayesian method chosen on validation: preset field -> its grid field.
TUNED = {
    "dwp": {"dwp_beta": "beta_grid", "dwp_init": "dwp_init_grid"},
    "normal_prior": {"normal_beta": "beta_grid", "normal_init": "normal_init_grid"},
}


def tuning_cell(preset: Preset, method: str) -> Cell:
    """Where settings are chosen: the smallest training set, split 0 (validation Dice)."""
    return Cell(method, preset.sizes[0], 0)


def candidates(preset: Preset, method: str) -> list[dict[str, Any]]:
    """The settings tried for ``method``: every combination of its non-empty grids, KL
    weights in increasing order, initialisations in grid order (``[]``: nothing to tune)."""
    axes = {}
    for name, grid_name in TUNED.get(method, {}).items():
        values = getattr(preset, grid_name)
        if values:
            axes[name] = sorted(values) if grid_name == "beta_grid" else list(values)
    if not axes:
        return []
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def choose_settings(
    preset: Preset, method: str, score: Callable[[Preset], float | None]
) -> tuple[Preset, dict[str, Any] | None]:
    """The preset with ``method``'s tuned settings (:data:`TUNED`) set to the candidate
    of highest validation Dice (``score(candidate_preset)``; the test set is never looked
    at).

    Ties go to the earlier candidate of :func:`candidates` (the smaller KL weight, then
    the earlier initialisation).  Without a grid (or for a method with nothing to tune)
    the preset is returned unchanged with ``None``.  A candidate scored ``None`` (a cell
    not run yet, in :func:`~.execution.merge`) makes the choice impossible: ``ValueError``.
    """
    options = candidates(preset, method)
    if not options:
        return preset, None
    scores = [score(preset.replace(**option)) for option in options]
    missing = [option for option, value in zip(options, scores, strict=True) if value is None]
    if missing:
        raise ValueError(f"{method}: no validation result for {missing}; run those cells")
    best = max(range(len(options)), key=scores.__getitem__)  # the first of equal maxima
    cell = tuning_cell(preset, method)
    selection = {
        "method": method,
        "size": cell.size,
        "split": cell.split,
        "candidates": [
            {**option, "val_dice": value} for option, value in zip(options, scores, strict=True)
        ],
        "chosen": options[best],
    }
    return preset.replace(**options[best]), selection


def choose_all(
    preset: Preset, methods: Iterable[str], score: Callable[[Preset, str], float | None]
) -> tuple[Preset, list[dict[str, Any]]]:
    """:func:`choose_settings` for each tuned one of ``methods`` in turn (``score(candidate,
    method)``): the preset with every choice made, and the selections made."""
    selections = []
    for method in sorted(set(methods) & set(TUNED)):
        preset, selection = choose_settings(preset, method, lambda p, m=method: score(p, m))
        if selection:
            selections.append(selection)
    return preset, selections
