"""The main job: does a learned weight prior help on a handful of target volumes?

Every learned prior of :mod:`dwp` (the deep weight prior of Kuzina et al. 2019, a
full-covariance Gaussian per kernel group, the source-trajectory SWAG prior of Shwartz-Ziv
et al. 2022) against tuned fine-tuning (PR), L2-SP, frozen fine-tuning (PRf), random init
(RI) and the Bayesian control with an N(0, 1) prior, in two transfer regimes (``near``: a
bright tumour on a T2-like target; ``far``: the same tumours dark on a T1-like one), at
several target training-set sizes and splits, every method's strength chosen on
validation from the same number of runs::

    python -m benchmarks.transfer --seed 0                      # the quick preset
    python -m benchmarks.transfer --preset ci --seed 0          # smoke run (minutes)
    python -m benchmarks.transfer --preset full --seed 0        # to convergence (CPU)
    python -m benchmarks.transfer --engine submitit --cluster slurm --slurm-gpus 1
    python -m benchmarks.transfer --only method=dwp,size=5,split=0   # by hand, then:
    python -m benchmarks.transfer --merge machineA/work machineB/work

Stages, each a folder under ``--work-dir`` named by a hash of everything it depends on
(so a changed setting never reuses a stale result, and an unchanged one is never redone):

1. ``data/``: the offline cohorts (``ms_source`` FLAIR-like MS lesions as the source,
   the regime's target, :data:`~.config.REGIMES`), or the user's Decathlon folders
   (``--source-data``, ``--target-data``; the target's test images need ``labelsTs/``);
2. ``source-<hash>/``: source U-Nets trained by :func:`unet3d.train.train` with cyclical
   restarts; every cycle's final network is one kernel set; net 0's trajectory gives the
   SWAG moments; how far each group's kernels moved from initialisation is reported;
3. ``prior-<hash>/``: the kernel bank (7 resolution groups), one kernel VAE per group
   (:meth:`dwp.DeepWeightPrior.fit`) and one Gaussian per group
   (:meth:`dwp.KernelGaussianPrior.fit`), the SWAG prior, their held-out fit report;
4. ``runs/<method>-<hash>/n<size>/split<k>/``: one training run per grid cell, resumable
   (``last.pt``), trained when ``training.json`` exists (all a tuning candidate needs:
   its validation scores) and finished when ``result.json`` does (scored on the test set).

Stages 2 and 3 of the quick preset are committed (:mod:`.artefact`, a few MB in
``benchmarks/artefacts/``, checked against their SHA-256 before use), so a fresh clone
starts at the grid.

The training subsets are nested (split ``k`` draws one permutation of the target pool and
size ``n`` takes its first ``n`` subjects) and shared by every method; validation (learning
rate schedule, best checkpoint, every method's strength) uses a fixed set of target
subjects outside the pool, the test set is never looked at during training or selection.

The report (``--out``, default ``benchmarks/results``): ``transfer[_<preset>].md`` with the
answer (each method against tuned fine-tuning), per regime Dice, IoU, HD95, ECE and
error-detection AUROC with confidence intervals, paired differences with bootstrap
intervals over splits and test volumes and the minimum detectable difference
(:mod:`.statistics`), the posterior diagnostics, the settings chosen on validation, the
source and prior diagnostics; ``.json`` with the config and every run's metrics;
``.png`` with Dice against train size.

The package, along those seams: :mod:`.config` (the methods, :class:`Preset`, whose
fields declare the stages they change, and its presets), :mod:`.keys` (every stage's
cache key, from those declarations; the cache itself is :mod:`benchmarks.stages`),
:mod:`.data`, :mod:`.sources`, :mod:`.prior` and :mod:`.cells` (the four stages),
:mod:`.artefact` and :mod:`.make_artefact` (the committed source artefact),
:mod:`.selection` (the settings chosen on validation), :mod:`.execution` (:func:`run`,
:func:`merge`, the worker processes or the submitit jobs of :mod:`benchmarks.grid`),
:mod:`.statistics` and :mod:`.summary` (the numbers), :mod:`.report` and :mod:`.cli`.
"""

from .artefact import ArtefactError
from .cells import Cell, grid, parse_only, split_indices
from .cli import main
from .config import (
    BAYESIAN,
    INITS,
    LABELS,
    METHODS,
    PRESETS,
    REGIMES,
    STAGES,
    Preset,
    override,
)
from .data import Data, data_key, prepare_data
from .execution import CellRunner, Plan, merge, merge_regimes, run, run_regimes
from .keys import stage_key, strategy_options, upstream
from .prior import fit_prior
from .report import render, write_report
from .selection import TUNED, candidates, choose_settings, tuning_cell
from .sources import train_sources
from .statistics import PairedDifference, minimum_detectable_difference, paired_difference
from .summary import summarise

__all__ = [
    "BAYESIAN",
    "INITS",
    "LABELS",
    "METHODS",
    "PRESETS",
    "REGIMES",
    "STAGES",
    "TUNED",
    "ArtefactError",
    "Cell",
    "CellRunner",
    "Data",
    "PairedDifference",
    "Plan",
    "Preset",
    "candidates",
    "choose_settings",
    "data_key",
    "fit_prior",
    "grid",
    "main",
    "merge",
    "merge_regimes",
    "minimum_detectable_difference",
    "override",
    "paired_difference",
    "parse_only",
    "prepare_data",
    "render",
    "run",
    "run_regimes",
    "split_indices",
    "stage_key",
    "strategy_options",
    "summarise",
    "train_sources",
    "tuning_cell",
    "upstream",
    "write_report",
]
