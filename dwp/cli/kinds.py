"""The prior kinds ``dwp fit-prior`` makes, and how each is made from its input.

Every kind is the library's own constructor or fit, called with the options the user gave
and nothing else, so a prior made on the command line is the prior the Python API makes
from the same input and arguments (the same seed gives the same file contents):

=====================  ==============================  ======================================
kind                   input                           the call
=====================  ==============================  ======================================
``dwp``                a kernel bank                   :meth:`dwp.DeepWeightPrior.fit`
``kernel-gaussian``    a kernel bank                   :meth:`dwp.KernelGaussianPrior.fit`
``swag``               a SWAG moments file             :meth:`dwp.SWAGPrior.from_moments`
``normal``             nothing                         :class:`dwp.NormalPrior`
``pretrained-normal``  nothing (a template)            :class:`dwp.PretrainedNormalPrior`
``log-uniform``        nothing                         :class:`dwp.LogUniformPrior`
=====================  ==============================  ======================================

Each also says how well it fits data it did not see, where it was fitted on data: the
kernel priors on held-out kernels (:func:`dwp.priors.held_out_scores`, in nats per kernel),
the SWAG prior on the weights of held-out networks (:func:`dwp.priors.weight_scores`, in
nats per weight).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..kernel_bank import KernelBank
from ..kernels import _load_checkpoint
from ..priors import (
    DeepWeightPrior,
    KernelGaussianPrior,
    LogUniformPrior,
    NormalPrior,
    PretrainedNormalPrior,
    Prior,
    SWAGPrior,
)
from ..priors.report import held_out_scores, render_scores, split_bank
from ..priors.weight_report import render_weight_scores, weight_scores
from ..swag import SWAGMoments
from .arguments import api_default

__all__ = ["KINDS", "Fit", "Kind", "fit_kernel_prior", "fit_swag", "make_plain"]


@dataclass(frozen=True)
class Kind:
    """A prior kind of the command line.

    Attributes
    ----------
    name
        Its ``--kind`` value.
    cls
        The prior class it makes (what :func:`dwp.priors.load_prior` returns for its file).
    source
        What it is made from: ``"kernels"`` (SOURCE files or ``--bank``), ``"moments"``
        (``--moments``) or ``"nothing"``.
    summary
        One line for ``--help``.
    """

    name: str
    cls: type[Prior]
    source: str
    summary: str


#: The kinds, by ``--kind`` value; ``tests/test_fit_prior_cli.py`` checks that every
#: fittable prior class of :mod:`dwp.priors` has one.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("dwp", DeepWeightPrior, "kernels", "one kernel VAE per group (Atanov et al. 2019)"),
        Kind(
            "kernel-gaussian",
            KernelGaussianPrior,
            "kernels",
            "a full-covariance Gaussian per kernel group",
        ),
        Kind(
            "swag",
            SWAGPrior,
            "moments",
            "low-rank + diagonal Gaussian per layer (SWA moments)",
        ),
        Kind("normal", NormalPrior, "nothing", "isotropic N(loc, scale^2)"),
        Kind(
            "pretrained-normal",
            PretrainedNormalPrior,
            "nothing",
            "MOPED, centred on the weights it is attached to",
        ),
        Kind(
            "log-uniform", LogUniformPrior, "nothing", "improper 1/|w| (sparse variational dropout)"
        ),
    )
}


@dataclass
class Fit:
    """A prior and how well it fits held-out data.

    Attributes
    ----------
    prior
        The prior, as its file will hold it.
    scores
        :func:`~dwp.priors.held_out_scores` (kernel priors; ``unit`` "nats per kernel") or
        :func:`~dwp.priors.weight_scores` (``unit`` "nats per weight"); ``None`` when there
        is nothing held out to score on.
    table
        ``scores`` as a Markdown table, or a sentence saying why there are none.
    scored
        How the scores were obtained, in words, for the report.
    split
        The per-group split of the bank the kernel scores used (``val_fraction``,
        ``test_fraction``, ``seed``), else ``None``.
    """

    prior: Prior
    scores: dict[str, Any] | None = None
    table: str = ""
    scored: str = ""
    split: dict[str, Any] | None = None


def _split(options: Mapping[str, Any]) -> dict[str, Any]:
    """The bank split of :meth:`DeepWeightPrior.fit` for ``options``: its defaults where not
    given, so the kernel Gaussian's test kernels are the deep weight prior's."""
    return {
        name: options.get(name, api_default(DeepWeightPrior.fit, name))
        for name in ("val_fraction", "test_fraction", "seed")
    }


def fit_kernel_prior(
    kind: Kind, bank: KernelBank, options: Mapping[str, Any], *, progress: bool
) -> Fit:
    """A ``dwp`` or ``kernel-gaussian`` prior fitted on every kernel of ``bank``.

    Parameters
    ----------
    kind
        ``KINDS["dwp"]`` or ``KINDS["kernel-gaussian"]``.
    bank
        The kernels, ``(N, *kernel_shape)`` in groups.
    options
        Keyword arguments of :meth:`DeepWeightPrior.fit` (and through it of
        :func:`dwp.fit_kernel_vae`), or of :meth:`KernelGaussianPrior.fit` plus the split
        options ``val_fraction``, ``test_fraction``, ``seed`` of its held-out scores.
    progress
        Show the VAE fits' tqdm bars.
    """
    split = _split(options)
    if kind.cls is DeepWeightPrior:
        # the fit splits each group three ways and scores on the test part itself
        prior = DeepWeightPrior.fit(bank, progress=progress, **options)
        scores = prior.metadata.get("held_out")
        scored = (
            "each group's VAE fitted on its training kernels (early stopping and the best "
            "epoch chosen on the validation kernels) and scored on its test kernels, which "
            "took part in no choice, next to kernel Gaussians fitted on the same training "
            "kernels; the saved VAEs are these"
        )
        return Fit(prior, scores, prior.fit_report(), scored, split if scores else None)

    fit_options = {k: v for k, v in options.items() if k not in split}
    prior = KernelGaussianPrior.fit(bank, **fit_options)
    if split["test_fraction"] == 0:
        return Fit(prior, table="No held-out scores: --test-fraction 0 keeps no test kernels.")
    # The saved prior uses every kernel; its held-out score is that of the same fit on the
    # training part of the deep weight prior's split (same seed and fractions), so the
    # numbers are comparable with a `dwp` report's kernel Gaussian column, kernel for kernel.
    parts = split_bank(bank, **split)
    train = {group: part["train"] for group, part in parts.items()}
    test = {group: part["test"] for group, part in parts.items()}
    shrinkage = {k: v for k, v in fit_options.items() if k == "shrinkage"}
    compared = {
        "kernel Gaussian": KernelGaussianPrior.fit(train, **shrinkage),
        "diagonal Gaussian": KernelGaussianPrior.fit(train, diagonal=True),
    }
    scores = held_out_scores(compared, test, reference="kernel Gaussian", seed=split["seed"])
    scored = (
        "the same fit (full and diagonal covariance) on each group's training kernels, scored "
        "on its test kernels (the split of a `dwp` fit with the same seed and fractions); the "
        "saved prior is fitted on all kernels"
    )
    return Fit(prior, scores, render_scores(scores), scored, split)


def _held_out_network(path: Path, prior: SWAGPrior) -> dict[str, Tensor]:
    """The weights of a held-out network file, checked against the prior's layers (so a
    network of another architecture is an error naming the file, not a bare KeyError)."""
    # read as collect_kernels reads a SOURCE (a state dict, or one under "state_dict" or
    # "model"): one rule for what a network file is, not a second copy of it here
    state = _load_checkpoint(path)
    for layer, shape in prior.layers.items():
        site = f"{layer}.weight"
        weight = state.get(site)
        if not isinstance(weight, Tensor):
            known = list(prior.layers)
            raise ValueError(
                f"{path}: the held-out network has no {site!r}, a layer of the SWAG moments "
                f"({len(known)} layers: {known[:4]}{'...' if len(known) > 4 else ''}); was it "
                "another architecture?"
            )
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(
                f"{path}: {site!r} has shape {tuple(weight.shape)}, the SWAG moments' layer "
                f"{tuple(shape)}; was it another architecture?"
            )
    return dict(state)


def fit_swag(
    moments_path: str | os.PathLike,
    held_out: Sequence[str | os.PathLike],
    options: Mapping[str, Any],
) -> Fit:
    """The SWAG prior of a moments file (``options``: ``scale``, ``learn_scale``), scored
    on the weights of ``held_out`` networks against its controls when there are any."""
    prior = SWAGPrior.from_moments(SWAGMoments.load(moments_path), **options)
    described = (
        f"{len(prior.layers)} layers, {prior.loc.numel():,} weights, rank {prior.rank}, "
        f"{prior.metadata['n_snapshots']} snapshots"
    )
    if not held_out:
        return Fit(prior, table=f"SWAG prior: {described}. No --held-out networks to score on.")
    networks = [_held_out_network(Path(p), prior) for p in held_out]
    compared = {
        "SWAG": prior,
        "marginal": prior.marginal(),  # the same variances without correlations
        "isotropic": prior.marginal(pooled=True),  # one variance
    }
    sites = [f"{layer}.weight" for layer in prior.layers]
    scores = weight_scores(compared, networks, sites, reference="marginal")
    scored = (
        "log density of each held-out network's weights per weight (closed form), for the "
        "SWAG prior, its marginal (SWAGPrior.marginal(): no correlations) and an isotropic "
        "Gaussian at the same mean (marginal(pooled=True)); differences paired over networks"
    )
    return Fit(prior, scores, f"SWAG prior: {described}.\n\n{render_weight_scores(scores)}", scored)


def make_plain(kind: Kind, options: Mapping[str, Any]) -> Fit:
    """A prior fitted from nothing (``normal``, ``pretrained-normal``, ``log-uniform``):
    its constructor called with ``options``."""
    prior = kind.cls(**options)
    if kind.cls is PretrainedNormalPrior:
        table = (
            "A PretrainedNormalPrior template: dwp.bayesianize centres it on each layer's "
            "weights when it attaches it (load the pretrained weights first, init='pretrained')."
        )
    else:
        table = f"{kind.cls.__name__}: fitted from nothing, nothing to score."
    return Fit(prior, table=table)
