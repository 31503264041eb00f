"""Negative log-likelihoods **summed** over observations, the data term of the ELBO.

The ELBO compares the data term with a KL summed over every weight, so the data term must
be a log-likelihood summed over every observation (every voxel in segmentation).  A
mean-reduced loss shrinks it by the number of observations and lets the KL swamp it: the
network collapses to its prior.  These helpers make the right reduction the easy one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .normal import normal_log_density

__all__ = ["bernoulli_nll", "categorical_nll", "gaussian_nll"]


def categorical_nll(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """-sum log softmax(logits)[target]; logits ``(B, C, *)``, integer target ``(B, *)``."""
    return F.cross_entropy(logits, target, weight=weight, reduction="sum")


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """-sum log Bernoulli(target | sigmoid(logits)); any shape, target in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum")


def gaussian_nll(prediction: Tensor, target: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """-sum log N(target | prediction, scale^2), constants included; any shape."""
    return -normal_log_density(target, prediction, scale).sum()
