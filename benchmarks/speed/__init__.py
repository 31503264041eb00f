"""Speed of Bayesian 3D U-Net training: layer estimators, the deep weight prior, VAE fitting,
the unet3d application's strategies and inference, float32 against mixed precision.

Five sections, each run by default and selectable with ``--sections``:

``layers``
    One training step (forward, loss + KL, backward, SGD step) of the reference
    :class:`unet3d.UNet3D` (default widths, 726,480 parameters), once deterministic and once
    per estimator with its 3x3x3 convs turned Bayesian by
    ``dwp.bayesianize(net, include=kernel3_layers(net), estimator=...)`` (the paper keeps
    the 1x1x1 convs deterministic), each as a ratio to the deterministic step.
``kl``
    What the deep weight prior adds to a training step: ``dwp.kl(model)`` and its
    ``.backward()`` alone (no network forward), for the default MLP
    :class:`dwp.KernelVAE` over UNet3D's 26,640 3x3x3 kernels (one VAE, and seven, one per
    resolution group as in the MRI paper), over the 4x wider UNet3D's 426,048 kernels, and
    for the paper's conv VAE; each as a ratio to the deterministic training step of the
    U-Net it belongs to, measured in the same interleaved run.
``fit``
    Wall time of ``dwp.fit_kernel_vae`` (default settings, 50 epochs) on 100,000 kernels.
``unet3d``
    One step of :func:`unet3d.train.train`'s loop (the strategy's loss and parameter
    groups, Adam) of the default UNet3D at 64^3, batch 2, for every strategy of
    :data:`unet3d.strategies.STRATEGIES`, as a ratio to ``random_init`` (interleaved as
    above); then :func:`unet3d.inference.predict_volume` on a 240 x 240 x 155 volume
    (64^3 windows, overlap 0.5): deterministic, and Bayesian with 1 and 8 posterior samples.
    Each inference case runs once, in a fresh interpreter, which reports its wall time and
    its peak RSS above the RSS after building the model and the input (``VmHWM`` reset
    through ``/proc/self/clear_refs``).
``precision``
    On ``--device`` (CPU by default; a GPU at 128^3, the issue's setting): one training
    step of ``random_init``, ``normal_prior`` and ``dwp`` in float32 and under mixed
    precision (:mod:`dwp.amp`, as ``unet3d train --amp`` runs it), and the KL bound alone:
    the Bayesian / deterministic ratio, the KL's share of a step, the mixed-precision
    speed-up and peak CUDA memory (:mod:`~benchmarks.speed.precision`).

Usage::

    python -m benchmarks.speed --seed 0            # full run, writes benchmarks/results/speed.*
    python -m benchmarks.speed --sections precision --device cuda  # the GPU section
    python -m benchmarks.speed --sections kl       # one section; the other sections' results
                                                   # in speed.json / speed.md are kept
    python -m benchmarks.speed --quick --out /tmp  # smoke run (tiny everything): speed_quick.*

Methodology
-----------
* Every variant of a section is built from the same seeded weights and sees the same input.
* Each variant is warmed up (allocator, oneDNN primitive caches), then the variants of a
  section are timed **round-robin**, so slow drifts of the machine (thermal, other load)
  hit every variant alike; the starting variant rotates each round.  Variants too slow for
  every round (the 4x wider U-Net's step, the conv VAE) take part in a few rounds spread
  evenly over the run.
* Reported: median and inter-quartile range, and the ratio of medians to a baseline
  measured in the same run.  Wall times are machine-dependent and never asserted.
* glibc's allocator is tuned once, before anything runs, for every variant and baseline.
* Other processes: each section records how many cores other processes kept busy on
  average (``/proc/stat`` minus this process's CPU time).  On a 2-core machine a single
  busy neighbour stalls every 2-thread op, inflating times several-fold; the fit, a
  single unrepeated measurement without an IQR, is flagged ``noisy`` by this alone.
* Memory: the bytes of distinct tensor storages autograd keeps for the backward pass
  after one forward pass.  Unlike the process-wide, monotone ``ru_maxrss``, this is a
  clean per-variant number on any device.  Inference, whose peak is the number that
  matters, is measured as peak RSS instead, one fresh process per case.

Modules
-------
:mod:`~benchmarks.speed.settings` (targets, full and ``--quick`` sizes),
:mod:`~benchmarks.speed.machine` (allocator, other processes' load, memory),
:mod:`~benchmarks.speed.timing` (the interleaved timing harness and summary rows), one
module per section (:mod:`~benchmarks.speed.layers`, :mod:`~benchmarks.speed.kl`,
:mod:`~benchmarks.speed.fit`, :mod:`~benchmarks.speed.unet3d` with
:mod:`~benchmarks.speed.inference`), :mod:`~benchmarks.speed.results` (merging and the
Markdown report) and :mod:`~benchmarks.speed.cli`.
"""

from __future__ import annotations

from .cli import main, parse_args
from .kl import forward_samples
from .machine import busy_note, tune_glibc_malloc
from .results import TITLES
from .settings import FIT_TARGET_S, FULL, KL_TARGET, LAYER_TARGETS, QUICK, SECTIONS, Settings
from .timing import schedule

__all__ = [
    "FIT_TARGET_S",
    "FULL",
    "KL_TARGET",
    "LAYER_TARGETS",
    "QUICK",
    "SECTIONS",
    "TITLES",
    "Settings",
    "busy_note",
    "forward_samples",
    "main",
    "parse_args",
    "schedule",
    "tune_glibc_malloc",
]
