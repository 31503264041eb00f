"""Monte Carlo prediction with Bayesian networks and the uncertainty measures built on it.

How good those probabilities and uncertainties are (NLL, Brier, ECE, error-detection
AUROC) is :mod:`dwp.uncertainty`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .controls import sampling
from .nn import check_posteriors
from .select import bayesian_layers
from .settings import validation_enabled
from .uncertainty import expected_calibration_error  # re-exported from its old home

__all__ = [
    "Prediction",
    "PredictiveStatistics",
    "entropy",
    "expected_calibration_error",
    "predict",
]

Task = Literal["regression", "classification"]
Activation = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class Prediction:
    """Summary of ``n_samples`` stochastic forward passes.

    Attributes
    ----------
    mean
        Regression: the mean output, shape of the output.  Classification: the predictive
        probabilities ``E_q[p(y | x, w)]``, shape ``(B, C, *)``.
    variance
        Variance over posterior samples of the output (regression) or of the class
        probabilities (classification): the epistemic spread, same shape as ``mean``
        (unbiased, zero when ``n_samples == 1``).
    predictive_entropy
        ``H[E_q p]``: total uncertainty, shape ``(B, *)`` for softmax, ``(B, C, *)`` for
        sigmoid outputs (one binary variable per channel).  ``None`` for regression.
    expected_entropy
        ``E_q H[p]``: the aleatoric part.
    mutual_information
        ``H[E_q p] - E_q H[p]`` (BALD): the epistemic part, >= 0.
    n_samples
        Number of forward passes averaged.
    """

    mean: Tensor
    variance: Tensor
    predictive_entropy: Tensor | None = None
    expected_entropy: Tensor | None = None
    mutual_information: Tensor | None = None
    n_samples: int = 1


def entropy(probs: Tensor, activation: Activation = "softmax", class_dim: int = 1) -> Tensor:
    """Entropy in nats of categorical (``softmax``: over ``class_dim``) or elementwise
    Bernoulli (``sigmoid``) probabilities.  ``0 log 0`` is taken as 0."""
    plogp = torch.special.xlogy(probs, probs)
    if activation == "softmax":
        return -plogp.sum(dim=class_dim)
    return -(plogp + torch.special.xlogy(1 - probs, 1 - probs))


class PredictiveStatistics:
    """Streaming statistics of Monte Carlo outputs, one pass at a time.

    Memory does not grow with the number of passes: only running sums (in float64, many
    small terms) of the outputs, of their squared deviations (Welford's update, when
    ``variance``) and, for probabilities, of their entropies are kept.

    Parameters
    ----------
    task
        ``"regression"``: outputs are summarised as they are.  ``"classification"``:
        outputs are probabilities, and the entropies are tracked too.
    activation
        How the probabilities were made (``"softmax"`` over ``class_dim``, or
        ``"sigmoid"``: independent binary channels), for the entropy.
    class_dim
        Dimension of the classes.
    variance
        Track the variance over passes (one more output-sized buffer); a caller that needs
        only the mean and the entropies (a whole-volume prediction) saves that memory.

    Examples
    --------
    >>> stats = PredictiveStatistics("classification")
    >>> for _ in range(8):
    ...     stats.update(model(x).softmax(1))
    >>> prediction = stats.result()
    """

    def __init__(
        self,
        task: Task = "regression",
        activation: Activation = "softmax",
        class_dim: int = 1,
        variance: bool = True,
    ) -> None:
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.task, self.activation, self.class_dim = task, activation, class_dim
        self.track_variance = variance
        self.n = 0
        self._mean: Tensor | None = None  # running mean (Welford) or running sum
        self._m2: Tensor | None = None
        self._sum_entropy: Tensor | None = None
        self._dtype: torch.dtype | None = None

    def update(self, output: Tensor) -> None:
        """Add one pass's output (probabilities for classification)."""
        self._dtype = output.dtype
        out = output.double()
        self.n += 1
        if self._mean is None:
            self._mean = out.clone()
            if self.track_variance:
                self._m2 = torch.zeros_like(out)
        elif self.track_variance:  # Welford's update of the running mean and sum of squares
            delta = out - self._mean
            self._mean += delta / self.n
            self._m2 += delta * (out - self._mean)
        else:  # a plain running sum; divided once at the end
            self._mean += out
        if self.task == "classification":
            h = entropy(out, self.activation, self.class_dim)
            self._sum_entropy = h if self._sum_entropy is None else self._sum_entropy.add_(h)

    @property
    def mean(self) -> Tensor:
        """The mean output so far, float64."""
        if self._mean is None:
            raise ValueError("no output added yet")
        return self._mean if self.track_variance else self._mean / self.n

    def result(self, dtype: torch.dtype | None = None) -> Prediction:
        """The :class:`Prediction` of the passes so far, in ``dtype`` (default: the dtype
        of the outputs).  Without ``variance`` tracking, ``variance`` holds zeros."""
        mean = self.mean
        dtype = dtype or self._dtype
        if self.track_variance and self.n > 1:
            variance = self._m2 / (self.n - 1)
        else:
            variance = torch.zeros_like(mean)
        if self.task == "regression":
            return Prediction(mean.to(dtype), variance.to(dtype), n_samples=self.n)
        total = entropy(mean, self.activation, self.class_dim)
        aleatoric = self._sum_entropy / self.n
        mutual_information = (total - aleatoric).clamp_min(0.0)
        return Prediction(
            mean=mean.to(dtype),
            variance=variance.to(dtype),
            predictive_entropy=total.to(dtype),
            expected_entropy=aleatoric.to(dtype),
            mutual_information=mutual_information.to(dtype),
            n_samples=self.n,
        )


@torch.no_grad()
def predict(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    n_samples: int = 16,
    *,
    task: Task | None = None,
    activation: Activation = "softmax",
    class_dim: int = 1,
    sample: bool = True,
) -> Prediction:
    """Monte Carlo predictive distribution of a Bayesian network.

    The model is put in ``eval()`` (dropout and norm layers in inference mode) with its
    Bayesian layers *sampling*, for the duration of the call; its state is restored after.
    Statistics are accumulated one pass at a time, so memory does not grow with
    ``n_samples`` (a 3D volume's 8 samples are never held together).

    Parameters
    ----------
    model
        A module, or any callable ``x -> output`` (e.g. a sliding-window predictor wrapping
        a module; Bayesian layers inside it must then be set to sample by the caller, e.g.
        with ``dwp.sampling()``).
    x
        Input batch.
    n_samples
        Number of posterior samples (forward passes).
    task
        Required.  ``"regression"``: outputs are averaged as they are.
        ``"classification"`` (also segmentation): outputs are logits, turned into
        probabilities by ``activation`` before averaging.  There is no default, and it is
        not guessed from the outputs: a classifier's logits averaged as a regression
        would give a mean of logits and no entropies, silently.
    activation
        ``"softmax"`` over ``class_dim``, or ``"sigmoid"`` (independent binary channels).
    class_dim
        Dimension of the classes in the output.
    sample
        ``False`` makes one pass with the posterior means (``n_samples`` is ignored).

    Returns
    -------
    Prediction

    Raises
    ------
    TypeError
        ``task`` not given.
    ValueError
        ``x`` has NaN or infinite values (a silent NaN prediction otherwise).
    FloatingPointError
        A forward pass produced NaN or infinite outputs from a finite input.

    Both checks are skipped after ``dwp.set_validation(False)``.
    """
    if task is None:
        raise TypeError(
            "dwp.predict needs task='classification' (outputs are logits: probabilities, "
            "entropies, mutual information) or task='regression' (outputs averaged as they are)"
        )
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    validate = validation_enabled()
    if validate and isinstance(x, Tensor) and x.is_floating_point():
        _check_finite_input(x)
    stats = PredictiveStatistics(task, activation, class_dim)
    is_module = isinstance(model, nn.Module)
    stochastic = sample and (not is_module or bool(bayesian_layers(model)))
    n_samples = n_samples if stochastic else 1

    def to_output(raw: Tensor) -> Tensor:
        if task == "regression":
            return raw
        return raw.softmax(class_dim) if activation == "softmax" else raw.sigmoid()

    was_training = model.training if is_module else False
    try:
        if is_module:
            model.eval()
        with sampling(stochastic, model if is_module else None):
            for i in range(n_samples):
                raw = model(x)
                if validate:
                    check_posteriors()  # those queued on an accelerator (one read per pass)
                if validate and not torch.isfinite(raw).all():
                    raise FloatingPointError(
                        f"forward pass {i + 1} of {n_samples} gave {_count_bad(raw)} from a "
                        "finite input: the network's weights or activations overflow "
                        "(dwp.set_validation(False) skips this check)"
                    )
                stats.update(to_output(raw))
    finally:
        if is_module:
            model.train(was_training)
    return stats.result()


def _count_bad(t: Tensor) -> str:
    """``"3 NaN and 1 inf values of 64"``: what is wrong in ``t``, in words."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"{nan} NaN and {inf} inf values of {t.numel()}"


def _check_finite_input(x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(
            f"x has {_count_bad(x)}: the prediction would be NaN; clean or mask the input "
            "(dwp.set_validation(False) skips this check)"
        )
