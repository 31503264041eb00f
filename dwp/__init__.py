"""dwp: Bayesian deep learning with learned weight priors.

The public API, re-exported here::

    dwp.BayesConv1d / 2d / 3d, dwp.BayesConvTranspose1d / 2d / 3d, dwp.BayesLinear
    dwp.bayesianize, dwp.to_deterministic
    dwp.priors.{NormalPrior, LogUniformPrior, PretrainedNormalPrior, DeepWeightPrior}
    dwp.collect_kernels, dwp.KernelBank, dwp.KernelVAE, dwp.fit_kernel_vae, dwp.init_from_prior_
    dwp.plot.plot_prior_samples
    dwp.kl, dwp.elbo, dwp.KLSchedule, dwp.param_groups, dwp.LossGuard
    dwp.estimator, dwp.sampling, dwp.fixed_sample, dwp.set_estimator, dwp.set_mode
    dwp.predict, dwp.PredictiveStatistics, dwp.expected_calibration_error
    dwp.bayesian_layers, dwp.LayerSelector (one way to walk and choose layers)
    dwp.TrainingLogger, dwp.TensorBoardLogger, dwp.CSVLogger, dwp.MultiLogger (dwp.train_log:
        per-step scalars of a training loop, training curves)
    dwp.io (atomic writes, torch files with named errors, versioned file formats)
    dwp.amp (mixed precision: autocast the forward pass, keep the KL and ELBO float32)
    dwp.pyro (Pyro interop, imported on first use)

The command line (``dwp fit-prior``, also ``python -m dwp``) is :mod:`dwp.cli`, which
nothing here imports.
"""

from __future__ import annotations

import importlib

from . import amp, likelihoods, optim, priors, train_log
from ._version import __version__
from .controls import estimator, fixed_sample, sampling, set_estimator, set_mode
from .convert import bayesianize, init_from_prior_, name_sites, to_deterministic
from .elbo import (
    DivergedLossError,
    ELBOTerms,
    KLSchedule,
    LossGuard,
    NonFiniteLossError,
    elbo,
    kl,
    kl_per_site,
    param_groups,
)
from .empirical_bayes import empirical_bayes_, prior_scales
from .io import CorruptFileError, LibraryFileError
from .kernel_bank import KernelBank, KernelBankError
from .kernels import collect_kernels
from .nn import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesianLayer,
    BayesLinear,
    NonFinitePosteriorError,
    check_posteriors,
)
from .posterior import MeanFieldNormal
from .predict import Prediction, PredictiveStatistics, predict
from .priors import (
    DeepWeightPrior,
    KernelGaussianPrior,
    LogUniformPrior,
    NormalPrior,
    PretrainedNormalPrior,
    Prior,
    PriorFileError,
    PriorMismatchError,
    SWAGPrior,
)
from .select import LayerSelector, bayesian_layers
from .settings import Estimator, Mode, set_validation
from .swag import SWAGMoments
from .train_log import CSVLogger, MultiLogger, TensorBoardLogger, TrainingLogger
from .uncertainty import (
    brier_score,
    error_detection_auroc,
    expected_calibration_error,
    negative_log_likelihood,
    uncertainty_metrics,
)
from .vae import KernelVAE, VAEFit, fit_kernel_vae

__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "BayesLinear",
    "BayesianLayer",
    "CSVLogger",
    "CorruptFileError",
    "DeepWeightPrior",
    "DivergedLossError",
    "ELBOTerms",
    "Estimator",
    "KLSchedule",
    "KernelBank",
    "KernelBankError",
    "KernelGaussianPrior",
    "KernelVAE",
    "LayerSelector",
    "LibraryFileError",
    "LogUniformPrior",
    "LossGuard",
    "MeanFieldNormal",
    "Mode",
    "MultiLogger",
    "NonFiniteLossError",
    "NonFinitePosteriorError",
    "NormalPrior",
    "Prediction",
    "PredictiveStatistics",
    "PretrainedNormalPrior",
    "Prior",
    "PriorFileError",
    "PriorMismatchError",
    "SWAGMoments",
    "SWAGPrior",
    "TensorBoardLogger",
    "TrainingLogger",
    "VAEFit",
    "__version__",
    "amp",
    "bayesian_layers",
    "bayesianize",
    "brier_score",
    "check_posteriors",
    "collect_kernels",
    "elbo",
    "empirical_bayes_",
    "error_detection_auroc",
    "estimator",
    "expected_calibration_error",
    "fit_kernel_vae",
    "fixed_sample",
    "init_from_prior_",
    "kl",
    "kl_per_site",
    "likelihoods",
    "name_sites",
    "negative_log_likelihood",
    "optim",
    "param_groups",
    "predict",
    "prior_scales",
    "priors",
    "sampling",
    "set_estimator",
    "set_mode",
    "set_validation",
    "to_deterministic",
    "train_log",
    "uncertainty_metrics",
]


def __getattr__(name: str):
    if name in ("pyro", "plot"):  # imported on first use: Pyro models, matplotlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dwp' has no attribute {name!r}")
