"""The main job: the Kuzina et al. (2019) transfer comparison, end to end.

DWP (a variational U-Net with a deep weight prior learned on source kernels) against
pretrain + fine-tune (PR), pretrain with a frozen middle (PRf), random init (RI) and the
Bayesian control with an N(0, 1) prior, for several target training-set sizes and splits::

    python -m benchmarks.transfer --seed 0                      # the quick preset
    python -m benchmarks.transfer --preset ci --seed 0          # smoke run (a minute)
    python -m benchmarks.transfer --engine submitit --cluster slurm --slurm-gpus 1
    python -m benchmarks.transfer --only method=dwp,size=5,split=0   # by hand, then:
    python -m benchmarks.transfer --merge machineA/work machineB/work

Stages, each a folder under ``--work-dir`` named by a hash of everything it depends on
(so a changed setting never reuses a stale result, and an unchanged one is never redone):

1. ``data/``: the offline cohorts (``ms_source`` FLAIR-like MS lesions as the source,
   ``tumour_target`` T2-like whole tumour as the target), or the user's Decathlon folders
   (``--source-data``, ``--target-data``; the target's test images need ``labelsTs/``);
2. ``source-<hash>/``: source U-Nets trained by :func:`unet3d.train.train` with cyclical
   restarts; every cycle's final network is one kernel set;
3. ``prior-<hash>/``: the kernel bank (7 resolution groups), one kernel VAE per group
   (:meth:`dwp.DeepWeightPrior.fit`), the prior file, its fit report and figure;
4. ``runs/<method>-<hash>/n<size>/split<k>/``: one training run per grid cell, resumable
   (``last.pt``), finished when ``result.json`` exists.

The training subsets are nested (split ``k`` draws one permutation of the target pool and
size ``n`` takes its first ``n`` subjects) and shared by every method; validation (learning
rate schedule, best checkpoint) uses a fixed set of target subjects outside the pool, the
test set is never looked at during training or selection.

The report (``--out``, default ``benchmarks/results``): ``transfer[_<preset>].md`` with the
paper-format tables (Dice and IoU, mean (std) over splits), paired differences DWP minus
each baseline with a paired t-test across splits, the source and prior diagnostics;
``.json`` with the config and every run's metrics; ``.png`` with Dice against train size.

The package, along those seams: :mod:`.config` (the methods, :class:`Preset`, whose
fields declare the stages they change, and its presets), :mod:`.keys` (every stage's
cache key, from those declarations; the cache itself is :mod:`benchmarks.stages`),
:mod:`.data`, :mod:`.sources`, :mod:`.prior` and :mod:`.cells` (the four stages),
:mod:`.selection` (the settings chosen on validation), :mod:`.execution` (:func:`run`,
:func:`merge`, the worker processes or the submitit jobs of :mod:`benchmarks.grid`),
:mod:`.report` and :mod:`.cli`.
"""

from .cells import Cell, grid, parse_only, split_indices
from .cli import main
from .config import BAYESIAN, INITS, LABELS, METHODS, PRESETS, STAGES, Preset, override
from .data import Data, data_key, prepare_data
from .execution import CellRunner, Plan, merge, run
from .keys import stage_key, strategy_options, upstream
from .prior import fit_prior
from .report import render, summarise, write_report
from .selection import TUNED, candidates, choose_settings, tuning_cell
from .sources import train_sources

__all__ = [
    "BAYESIAN",
    "INITS",
    "LABELS",
    "METHODS",
    "PRESETS",
    "STAGES",
    "TUNED",
    "Cell",
    "CellRunner",
    "Data",
    "Plan",
    "Preset",
    "candidates",
    "choose_settings",
    "data_key",
    "fit_prior",
    "grid",
    "main",
    "merge",
    "override",
    "parse_only",
    "prepare_data",
    "render",
    "run",
    "split_indices",
    "stage_key",
    "strategy_options",
    "summarise",
    "train_sources",
    "tuning_cell",
    "upstream",
    "write_report",
]
