"""Training strategies of the ``unet3d`` application: what network to build, how to score it.

One training loop (:func:`unet3d.train.train`) runs every strategy; a strategy decides

* the network (:meth:`Strategy.build_model`): a plain :class:`~unet3d.model.UNet3D`, one
  loaded from a source checkpoint (:func:`unet3d.checkpoint.load_source`), or its
  variational version (:func:`dwp.bayesianize` of the 3x3x3 convs,
  :func:`~unet3d.model.kernel3_layers`);
* the training loss (:meth:`Strategy.loss`): the paper's ``0.01 * CE + Dice`` with mean
  reductions (:func:`unet3d.losses.paper_loss`) for the deterministic strategies (plus
  L2-SP's penalty towards the source weights for ``l2_sp``), the negative ELBO (:func:`dwp.elbo` of the *summed* data term
  :func:`unet3d.losses.elbo_data_term`) for the Bayesian ones;
* the optimiser (:meth:`Strategy.make_optimizer`, :func:`dwp.optim.build_optimizer`):
  frozen parameters are left out; the variational strategies default to
  :class:`dwp.optim.NaturalVI`, which needs their KL weight.

Registry (:data:`STRATEGIES`, :func:`get_strategy`):

=====================  ==============================================================
``random_init``        He-initialised U-Net (RI, the paper's baseline)
``pretrained``         every layer fine-tuned from a source checkpoint (PR)
``pretrained_frozen``  source weights, the middle blocks frozen (PRf); ``freeze_depth``
``l2_sp``              fine-tuned from a source checkpoint, pulled towards it (L2-SP);
                       ``alpha``
``normal_prior``       variational U-Net with an N(0, 1) prior (the Bayesian control)
``dwp``                variational U-Net with a :class:`dwp.DeepWeightPrior` (DWP)
``prior``              variational U-Net with the prior of any prior file
                       (:func:`dwp.priors.load_prior`: kernel Gaussian, SWAG, ...)
=====================  ==============================================================

Under ``DistributedDataParallel`` pass the *unwrapped* model and the *local* batch size to
:meth:`Strategy.loss`: the KL is then counted once per global step (see :mod:`dwp.elbo`).
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

import dwp

from .checkpoint import load_source
from .losses import elbo_data_terms, paper_loss
from .model import UNet3D, kernel3_layers

__all__ = [
    "STRATEGIES",
    "BayesianStrategy",
    "DWPStrategy",
    "L2SPStrategy",
    "ModelSpec",
    "NormalPriorStrategy",
    "PretrainedFrozenStrategy",
    "PretrainedStrategy",
    "PriorFileStrategy",
    "RandomInitStrategy",
    "Strategy",
    "block_names",
    "get_strategy",
]


@dataclass(frozen=True)
class ModelSpec:
    """The U-Net's shape: what :meth:`Strategy.build_model` needs from the training config
    (the arguments of :class:`unet3d.model.UNet3D`)."""

    in_channels: int = 1
    n_classes: int = 2
    widths: tuple[int, ...] = (16, 32, 32, 64)
    out_bias: bool = False

    def build(self) -> UNet3D:
        """A He-initialised :class:`~unet3d.model.UNet3D` of this shape."""
        return UNet3D(
            self.in_channels, self.n_classes, self.widths, init="he", out_bias=self.out_bias
        )


def block_names(model: nn.Module) -> list[str]:
    """The U-Net's blocks from input to output: ``init_conv``, ``down1``..``down6``,
    ``up1``..``up3``, ``out`` (its direct children, in order)."""
    return [name for name, _ in model.named_children()]


class Strategy(abc.ABC):
    """Interface of a training strategy (subclass it and register it in :data:`STRATEGIES`).

    Attributes
    ----------
    bayesian : bool
        Whether :meth:`loss` is the negative ELBO (summed data term scaled by ``N / B``).
    """

    name: str = "strategy"
    bayesian: bool = False

    @abc.abstractmethod
    def build_model(self, spec: ModelSpec) -> nn.Module:
        """The network to train (seed torch before calling it)."""

    @abc.abstractmethod
    def loss(
        self,
        model: nn.Module,
        logits: Tensor,
        target: Tensor,
        n_data: int,
        batch_size: int,
        step: int,
    ) -> tuple[Tensor, dict[str, float]]:
        """Training loss of one minibatch and its terms for logging.

        Parameters
        ----------
        model
            The unwrapped network (not the DDP wrapper).
        logits, target
            ``(B, C, D, H, W)`` outputs and ``(B, D, H, W)`` labels.
        n_data
            Training-set size ``N`` (global).
        batch_size
            This process's minibatch size (the local one under DDP).
        step
            Optimisation steps taken so far (for KL schedules).
        """

    #: The optimiser ``"auto"`` stands for (:class:`dwp.optim.OptimizerName`).
    default_optimizer: ClassVar[str] = "adam"

    def make_optimizer(
        self, model: nn.Module, name: str, lr: float, **options: Any
    ) -> torch.optim.Optimizer:
        """The optimiser ``name`` (``"auto"``: :attr:`default_optimizer`) for ``model``;
        ``options`` go to :func:`dwp.optim.build_optimizer`.  Parameters with
        ``requires_grad=False`` are left out."""
        name = self.default_optimizer if name == "auto" else name
        return dwp.optim.build_optimizer(name, model, lr, **options)

    def describe(self) -> dict[str, Any]:
        """Plain options for logs and checkpoints."""
        return {"name": self.name}


@dataclass
class RandomInitStrategy(Strategy):
    """RI: a He-initialised U-Net trained on the paper's loss."""

    ce_weight: float = 0.01
    dice_weight: float = 1.0
    name: str = field(default="random_init", init=False)

    def __post_init__(self) -> None:
        self._loss = paper_loss(self.ce_weight, self.dice_weight)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return spec.build()

    def loss(
        self,
        model: nn.Module,
        logits: Tensor,
        target: Tensor,
        n_data: int,
        batch_size: int,
        step: int,
    ) -> tuple[Tensor, dict[str, float]]:
        value = self._loss(logits, target)
        return value, {"loss": float(value.detach())}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ce_weight": self.ce_weight, "dice_weight": self.dice_weight}


@dataclass
class PretrainedStrategy(RandomInitStrategy):
    """PR: every layer fine-tuned from a source checkpoint (``source``)."""

    source: str | os.PathLike | None = None
    name: str = field(default="pretrained", init=False)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        if self.source is None:
            raise ValueError(f"strategy {self.name!r} needs source=<checkpoint path>")
        return load_source(super().build_model(spec), self.source)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": str(self.source)}


@dataclass
class PretrainedFrozenStrategy(PretrainedStrategy):
    """PRf: source weights; only the first and last blocks train, the middle is frozen.

    Parameters
    ----------
    freeze_depth
        Number of blocks kept trainable at *each* end of the chain
        ``init_conv, down1..down6, up1..up3, out`` (:func:`block_names`): 1 trains
        ``init_conv`` and ``out``, 2 adds ``down1`` and ``up3``, and so on.
    trainable
        An explicit list of block names (or qualified parameter-name prefixes) to train
        instead; overrides ``freeze_depth``.
    """

    freeze_depth: int = 1
    trainable: Sequence[str] | None = None
    name: str = field(default="pretrained_frozen", init=False)

    def trainable_prefixes(self, model: nn.Module) -> list[str]:
        """The blocks (parameter-name prefixes) left trainable."""
        if self.trainable is not None:
            return list(self.trainable)
        blocks = block_names(model)
        k = int(self.freeze_depth)
        if k < 0:
            raise ValueError(f"freeze_depth must be >= 0, got {k}")
        return blocks[:k] + [b for b in blocks[len(blocks) - k :] if b not in blocks[:k]]

    def build_model(self, spec: ModelSpec) -> nn.Module:
        model = super().build_model(spec)
        prefixes = self.trainable_prefixes(model)
        for name, p in model.named_parameters():
            p.requires_grad_(any(name == q or name.startswith(q + ".") for q in prefixes))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"no parameter matches the trainable blocks {prefixes}")
        return model

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "freeze_depth": self.freeze_depth,
            "trainable": None if self.trainable is None else list(self.trainable),
        }


@dataclass
class L2SPStrategy(PretrainedStrategy):
    """L2-SP (Li et al. 2018): fine-tuning from ``source`` with a penalty towards it.

    The loss is the paper's plus ``alpha / 2 * ||w - w_source||^2`` over every parameter
    the source checkpoint initialised (all of them: the U-Net has no new layers, so Li et
    al.'s second term, plain weight decay on new layers, is absent).  The starting point
    ``w_source`` is recorded by :meth:`build_model`.

    How it relates to the other strategies:

    * ``alpha = 0`` is ``pretrained`` exactly (the penalty is not even computed);
    * as ``alpha`` grows the weights stay closer to the source, towards a frozen network;
    * it is a MAP estimate under a Gaussian prior centred on the source weights:
      minimising ``L + alpha / 2 ||w - w_source||^2`` with the mean loss ``L`` of ``N``
      training volumes is minimising ``N L + (N alpha) / 2 ||w - w_source||^2``, the
      negative log-posterior under N(w_source, I / (N alpha)) when ``N L`` is read as the
      negative log-likelihood, i.e. under ``dwp.PretrainedNormalPrior(scale_factor=0,
      min_scale=(N alpha) ** -0.5)``.  The variational strategies with that prior (a file
      of it, strategy ``prior``) learn a posterior around the point L2-SP finds.

    Parameters
    ----------
    alpha
        Strength of the pull towards the source weights (>= 0).  The default, 0.01, is a
        starting point, not a tuned value: tune it as carefully as the priors' KL weight
        (well-tuned fine-tuning closes much of the gap reported for learned priors).
    """

    alpha: float = 0.01
    name: str = field(default="l2_sp", init=False)
    _source_weights: dict[str, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"strategy 'l2_sp' needs a finite alpha >= 0, got {self.alpha}")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        model = super().build_model(spec)
        self._source_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def penalty(self, model: nn.Module) -> Tensor:
        """``alpha / 2 * ||w - w_source||^2`` over the source-initialised parameters; its
        gradient is ``alpha * (w - w_source)``."""
        if not self._source_weights:
            raise RuntimeError("strategy 'l2_sp' records the source weights in build_model()")
        terms = []
        for name, param in model.named_parameters():
            source = self._source_weights.get(name)
            if source is None:
                continue
            if source.device != param.device:  # the loop moves the model after building it
                source = self._source_weights[name] = source.to(param.device)
            terms.append((param - source).pow(2).sum())
        return 0.5 * self.alpha * torch.stack(terms).sum()

    def loss(
        self,
        model: nn.Module,
        logits: Tensor,
        target: Tensor,
        n_data: int,
        batch_size: int,
        step: int,
    ) -> tuple[Tensor, dict[str, float]]:
        value, logged = super().loss(model, logits, target, n_data, batch_size, step)
        logged["paper_loss"] = logged["loss"]
        if self.alpha == 0:  # pretrained's loss, bit for bit
            return value, logged
        penalty = self.penalty(model)
        total = value + penalty
        logged.update(loss=float(total.detach()), l2_sp=float(penalty.detach()))
        return total, logged

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "alpha": self.alpha}


@dataclass
class BayesianStrategy(Strategy):
    """Common part of the variational strategies: ELBO loss, separate scale learning rate.

    Parameters
    ----------
    beta
        KL weight: a constant or a :class:`dwp.KLSchedule` (called with the step).
    scale_lr
        Learning rate of the posterior log-sigmas under the ``adam`` / ``sgd`` optimisers
        (default ``lr / 10``); the default optimiser, ``natural``, steps them by the
        natural gradient instead (:class:`dwp.optim.NaturalVI`).
    init
        Where the posterior means start (:func:`dwp.bayesianize`): ``"pretrained"`` keeps
        the base network's weights (the ``source`` checkpoint when given, He otherwise),
        ``"prior"`` samples the prior (DWP initialisation; N(0, 1) gives no samples, and
        its means get torch's initialisation), ``"fresh"`` re-initialises.
    source
        Checkpoint whose weights the base network loads (with ``init="pretrained"``, the
        posterior means start at the source network).
    init_log_sigma, estimator, mode
        Passed to :func:`dwp.bayesianize` (``mode="mean"`` trains without weight noise,
        which makes runs comparable across process counts).
    learn_scale
        Learn the prior's strength by empirical Bayes: a scale factor (per group for the
        deep weight prior) trained with the ELBO (:func:`dwp.prior_scales`), logged every
        epoch as ``train_prior_scale:<site>``.  An alternative to the KL-weight grid.
    ce_weight, dice_weight
        Weights per voxel of the summed data term (:func:`unet3d.losses.elbo_data_term`):
        its cross-entropy and its share of the volume's Dice loss.  The defaults are the
        deterministic strategies' loss, summed (a weaker Dice term traps runs in an
        all-background prediction: :mod:`unet3d.losses`).
    """

    beta: float | dwp.KLSchedule = 1.0
    scale_lr: float | None = None
    init_log_sigma: float | Literal["fan_in"] = "fan_in"
    estimator: str = "reparam"
    mode: str = "auto"
    ce_weight: float = 0.01
    dice_weight: float = 1.0
    init: Literal["pretrained", "prior", "fresh"] = "pretrained"
    source: str | os.PathLike | None = None
    learn_scale: bool = False
    bayesian: bool = field(default=True, init=False)

    @abc.abstractmethod
    def prior(self) -> dwp.Prior:
        """The weight prior of the 3x3x3 convs."""

    def base_model(self, spec: ModelSpec) -> nn.Module:
        """The deterministic U-Net whose 3x3x3 convs become Bayesian (the source
        network when ``source`` is set)."""
        model = spec.build()
        return model if self.source is None else load_source(model, self.source)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        base = self.base_model(spec)
        return dwp.bayesianize(
            base,
            self.prior(),
            include=kernel3_layers(base),
            init=self.init,
            init_log_sigma=self.init_log_sigma,
            estimator=self.estimator,
            mode=self.mode,
            inplace=True,
        )

    def beta_at(self, step: int) -> float:
        """KL weight at ``step``."""
        return float(self.beta(step) if callable(self.beta) else self.beta)

    def loss(
        self,
        model: nn.Module,
        logits: Tensor,
        target: Tensor,
        n_data: int,
        batch_size: int,
        step: int,
    ) -> tuple[Tensor, dict[str, float]]:
        data = elbo_data_terms(logits, target, self.ce_weight, self.dice_weight)
        terms = dwp.elbo(
            data.total, model, n_data=n_data, batch_size=batch_size, beta=self.beta_at(step)
        )
        logged = terms.as_dict()
        logged.update(ce=float(data.ce.detach()), dice=float(data.dice.detach()))
        if self.learn_scale:
            logged.update({f"prior_scale:{k}": v for k, v in dwp.prior_scales(model).items()})
        return terms.loss, logged

    default_optimizer: ClassVar[str] = "natural"

    def make_optimizer(
        self, model: nn.Module, name: str, lr: float, **options: Any
    ) -> torch.optim.Optimizer:
        """As :meth:`Strategy.make_optimizer`, with this strategy's KL weight (for
        ``natural``) and scale learning rate (for ``adam`` / ``sgd``)."""
        scale_lr = lr / 10 if self.scale_lr is None else self.scale_lr
        return super().make_optimizer(
            model, name, lr, kl_weight=self.beta_at, scale_lr=scale_lr, **options
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "beta": repr(self.beta) if callable(self.beta) else self.beta,
            "scale_lr": self.scale_lr,
            "init_log_sigma": self.init_log_sigma,
            "estimator": self.estimator,
            "mode": self.mode,
            "ce_weight": self.ce_weight,
            "dice_weight": self.dice_weight,
            "learn_scale": self.learn_scale,
            "init": self.init,
            "means_start": self.means_start(),
            "source": None if self.source is None else str(self.source),
        }

    def means_start(self) -> str:
        """Where the posterior means start, in words: ``init="pretrained"`` keeps the base
        network's weights, which are the source network's only when ``source`` is set."""
        if self.init == "pretrained":
            return "source network" if self.source is not None else "He init"
        return {"prior": "prior samples", "fresh": "fresh init"}[self.init]


@dataclass
class NormalPriorStrategy(BayesianStrategy):
    """Variational U-Net with an N(0, 1) prior on the 3x3x3 kernels (Bayesian baseline);
    posterior means start from He initialisation, or from the ``source`` network."""

    name: str = field(default="normal_prior", init=False)

    def prior(self) -> dwp.Prior:
        return dwp.NormalPrior(0.0, 1.0, learn_scale=self.learn_scale)

    def means_start(self) -> str:
        # N(0, 1) gives no initial weights (dwp.priors.Prior.init_sample): under
        # init="prior" the means get torch's initialisation, as under "fresh"
        return "fresh init" if self.init == "prior" else super().means_start()


@dataclass
class PriorFileStrategy(BayesianStrategy):
    """Variational U-Net with the weight prior of a file (``prior_path``), of any kind
    :func:`dwp.priors.load_prior` reads (a kernel Gaussian, a SWAG prior, a Gaussian, a
    deep weight prior), or the prior itself.

    ``prior_options`` override the file's constructor arguments.  Priors centred on the
    source network (a ``PretrainedNormalPrior()`` template) bind to the base network's
    weights, so give ``source``; the posterior means start there too (``init="pretrained"``,
    the default), from prior samples (``"prior"``) or fresh (``"fresh"``).
    """

    prior_path: str | os.PathLike | dwp.Prior | None = None
    prior_options: dict[str, Any] = field(default_factory=dict)
    name: str = field(default="prior", init=False)
    #: The kind of prior this strategy trains with: a file of another kind is an error.
    prior_kind: ClassVar[type[dwp.Prior]] = dwp.Prior

    def prior(self) -> dwp.Prior:
        kind = self.prior_kind.__name__
        if self.prior_path is None:
            raise ValueError(f"strategy {self.name!r} needs prior_path=<{kind} file>")
        if isinstance(self.prior_path, dwp.Prior):
            if not isinstance(self.prior_path, self.prior_kind):
                raise TypeError(
                    f"strategy {self.name!r} needs a {kind}, got a {type(self.prior_path).__name__}"
                )
            if self.learn_scale and not getattr(self.prior_path, "learn_scale", False):
                raise ValueError(
                    "learn_scale=True needs a prior file, or a prior built with learn_scale=True"
                )
            return self.prior_path
        options = {**self.prior_options}
        if self.learn_scale:
            options["learn_scale"] = True
        return self.prior_kind.load(self.prior_path, **options)

    def describe(self) -> dict[str, Any]:
        path = self.prior_path
        shown = "<in memory>" if isinstance(path, dwp.Prior) else str(path)
        return {**super().describe(), "prior": shown}


@dataclass
class DWPStrategy(PriorFileStrategy):
    """Variational U-Net with a deep weight prior (``prior``: a file of
    :meth:`dwp.DeepWeightPrior.save`, or the prior itself).

    ``init="prior"`` starts the posterior means from prior samples (DWP initialisation);
    ``init="pretrained"`` from the source checkpoint ``source`` (He init without one).
    """

    init: Literal["pretrained", "prior", "fresh"] = "prior"
    name: str = field(default="dwp", init=False)
    prior_kind: ClassVar[type[dwp.Prior]] = dwp.DeepWeightPrior


#: Strategy classes by name.
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "random_init": RandomInitStrategy,
    "pretrained": PretrainedStrategy,
    "pretrained_frozen": PretrainedFrozenStrategy,
    "l2_sp": L2SPStrategy,
    "normal_prior": NormalPriorStrategy,
    "dwp": DWPStrategy,
    "prior": PriorFileStrategy,
}


def get_strategy(name: str | Strategy, **options: Any) -> Strategy:
    """A strategy by registry name with its options (a :class:`Strategy` passes through)."""
    if isinstance(name, Strategy):
        if options:
            raise TypeError("options are only accepted with a strategy name")
        return name
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None
    return cls(**options)
