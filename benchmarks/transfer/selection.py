"""The settings of every method chosen on validation data (never the test set).

Each method gets the same budget: one validation run per value of its strength's grid
(the learning rate of the deterministic baselines, L2-SP's pull towards the source, each
prior's KL weight, the SWAG prior's scale), so no method is better tuned than another; Harvey et al. (2024)
found that a carefully tuned fine-tuning closes much of the gap reported for informative
priors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from .cells import Cell
from .config import LR_FROM, Preset

#: The settings of each method chosen on validation: preset field -> its grid field.
TUNED = {
    "dwp": {"dwp_beta": "beta_grid", "dwp_init": "dwp_init_grid"},
    "kernel_gaussian": {"kg_beta": "beta_grid"},
    "swag": {"swag_scale": "swag_scale_grid"},
    "normal_prior": {"normal_beta": "beta_grid", "normal_init": "normal_init_grid"},
    "l2_sp": {"l2sp_alpha": "alpha_grid"},
    "pretrained": {"pr_lr": "lr_grid"},
    "pretrained_frozen": {"prf_lr": "lr_grid"},
    "random_init": {"ri_lr": "lr_grid"},
}
#: Numeric grids, tried in increasing order (ties go to the smaller value).
NUMERIC_GRIDS = ("beta_grid", "alpha_grid", "lr_grid", "swag_scale_grid")


def tuning_cell(preset: Preset, method: str) -> Cell:
    """Where settings are chosen: the smallest training set, split 0 (validation Dice)."""
    return Cell(method, preset.sizes[0], 0)


def candidates(preset: Preset, method: str) -> list[dict[str, Any]]:
    """The settings tried for ``method``: every combination of its non-empty grids,
    numbers in increasing order, initialisations in grid order (``[]``: nothing to tune)."""
    axes = {}
    for name, grid_name in TUNED.get(method, {}).items():
        values = getattr(preset, grid_name)
        if values:
            axes[name] = sorted(values) if grid_name in NUMERIC_GRIDS else list(values)
    if not axes:
        return []
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def choose_settings(
    preset: Preset, method: str, score: Callable[[Preset], float | None]
) -> tuple[Preset, dict[str, Any] | None]:
    """The preset with ``method``'s tuned settings (:data:`TUNED`) set to the candidate
    of highest validation Dice (``score(candidate_preset)``; the test set is never looked
    at).

    Ties go to the earlier candidate of :func:`candidates` (the smaller value, then the
    earlier initialisation).  Without a grid (or for a method with nothing to tune)
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


def phases(preset: Preset, methods: Iterable[str]) -> list[set[str]]:
    """The order in which the settings of ``methods`` are chosen: first the methods whose
    learning rate others share (:data:`~.config.LR_FROM`; added when one of ``methods``
    needs it and the preset runs it), then those others, whose candidates train at the
    chosen rate.  A method whose lender the preset does not run keeps the preset's rate
    and is chosen in the first phase."""
    methods = set(methods)
    lenders = {LR_FROM[m] for m in methods if m in LR_FROM} & set(preset.methods)
    first = {m for m in methods | lenders if LR_FROM.get(m) not in lenders}
    return [first, (methods | lenders) - first]


def choose_all(
    preset: Preset, methods: Iterable[str], score: Callable[[Preset, str], float | None]
) -> tuple[Preset, list[dict[str, Any]]]:
    """:func:`choose_settings` for each tuned one of ``methods`` (``score(candidate,
    method)``), in the order of :func:`phases`: the preset with every choice made, and
    the selections made."""
    selections = []
    methods = set(methods)
    ordered = [m for phase in phases(preset, methods) for m in sorted(phase) if m in methods]
    for method in [m for m in ordered if m in TUNED]:
        preset, selection = choose_settings(preset, method, lambda p, m=method: score(p, m))
        if selection:
            selections.append(selection)
    return preset, selections


def budget(preset: Preset, methods: Iterable[str]) -> dict[str, int]:
    """Validation runs each of ``methods`` gets to choose its settings (0: none)."""
    return {method: len(candidates(preset, method)) for method in methods}
