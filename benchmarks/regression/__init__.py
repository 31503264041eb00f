"""Regression benchmark: 3D BagNets, Hydranet and importance maps on the synthetic cohorts.

Three sections, on 4 mm volumes of the offline MNI152-based cohorts (:mod:`cohorts`):

(a) **BagNet receptive field** 9 / 17 / 33 / 177: age MAE and sex accuracy on ``brain_age``,
    in the layout of Pawlowski & Glocker's table, with local-map figures of the youngest and
    the oldest test subject;
(b) **Hydranet** vs its base regressor, the base regressor with an N(0, 1) prior and with a
    deep weight prior (fitted on the 3x3x3 kernels of regressors trained on the ``ms_source``
    cohort's lesion count and volume), on ``lesion_count`` count and volume with 12-30
    training subjects: MSE and ICC(2,1), several seeds;
(c) **Importance maps**: a noise model (Bintsi et al. 2021) on the frozen best age BagNet,
    scored by AUC against the known ageing map, next to the BagNet local maps' AUC.

Usage::

    python -m benchmarks.regression --preset quick --seed 0       # ~20-30 min on 2 cores
    python -m benchmarks.regression --preset ci --out /tmp/reg    # a minute: pipeline check
    dwp-regression --preset full

Writes ``regression.json`` / ``regression.md`` (``regression_<preset>.*`` for presets other
than quick) and ``regression_local_maps.png``, ``regression_hydranet.png``,
``regression_importance.png`` into ``--out`` (default ``benchmarks/results``).

Every network belongs to one run (:mod:`.runs`) with its own result file under
``--work-dir`` (default ``runs/regression``), so a rerun reads finished runs back and
resumes the rest; ``--engine submitit`` sends the runs to submitit jobs (SLURM arrays, or
local processes), ``--jobs`` at a time (:mod:`benchmarks.grid`).

Honest small-scale caveats: tiny widths and a few hundred steps on CPU, synthetic anatomy
where sex changes brain size only, so numbers are not comparable with the papers' (which
are given beside them for the layout only).
"""

from __future__ import annotations

# .cli takes the command's --help description from this docstring's first paragraph
from .bagnets import BagnetRun, bagnet_runs, collect_bagnets
from .cli import main, parse_args
from .cohort import Cohort, age_cohorts, lesion_cohorts, load_cohort
from .config import METHODS, PRESETS, RECEPTIVE_FIELDS, Preset
from .figures import plot_hydranet, plot_importance, plot_local_maps
from .hydranet import HydraRun, PriorRun, collect_hydranet, fit_source_prior, hydranet_runs
from .importance import ImportanceRun, collect_importance, importance_run
from .report import render_markdown
from .runs import Run, Runner, work_folder

__all__ = [
    "METHODS",
    "PRESETS",
    "RECEPTIVE_FIELDS",
    "BagnetRun",
    "Cohort",
    "HydraRun",
    "ImportanceRun",
    "Preset",
    "PriorRun",
    "Run",
    "Runner",
    "age_cohorts",
    "bagnet_runs",
    "collect_bagnets",
    "collect_hydranet",
    "collect_importance",
    "fit_source_prior",
    "hydranet_runs",
    "importance_run",
    "lesion_cohorts",
    "load_cohort",
    "main",
    "parse_args",
    "plot_hydranet",
    "plot_importance",
    "plot_local_maps",
    "render_markdown",
    "work_folder",
]
