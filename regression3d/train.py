"""Training regressors and classifiers on image-level labels, deterministic or Bayesian.

One loop for every network of this package (and any other ``(N, C, *spatial) -> (N, K)``
module).  Whether it is Bayesian is read from the model: a network passed through
:func:`make_bayesian` (or :func:`dwp.bayesianize`) is trained on the negative ELBO,

    loss = nll_sum * N / B + beta * KL(q || p),

with the Gaussian (regression) or categorical (classification) log-likelihood **summed over
subjects** (:mod:`dwp.likelihoods`); a plain network on the same summed likelihood divided
by ``B``.  With image-level labels and a handful of subjects the data term is tiny next to
the KL of every weight, so ``beta`` (the KL weight) is exposed: choose it on validation data.

Regression targets are standardised inside (``(y - shift) / scale``) and predictions mapped
back; for Hydranet's set sums by default only scaled (``shift = 0``), so that sums stay sums
(:attr:`HydraConfig.centre` centres them too).

:meth:`FittedModel.predict` returns the predictive mean and the **epistemic** variance over
posterior samples (:func:`dwp.predict`); zero for a deterministic network.

To watch a fit, pass a :class:`dwp.TrainingLogger` (e.g. :class:`dwp.TensorBoardLogger`):
every step's loss terms, learning rates and posterior scales go to it
(:func:`dwp.train_log.step_scalars`); the fitted weights are the same without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import dwp
from dwp.amp import autocast, check_precision, grad_scaler, guard_cpu_bf16_conv3d
from dwp.devices import resolve_device
from dwp.train_log import TrainingLogger, step_scalars

from .hydranet import SetBatch, draw_sets, set_loss_backward, set_members, set_targets

__all__ = [
    "FittedModel",
    "HydraConfig",
    "TrainConfig",
    "fit",
    "kernel3_convs",
    "make_bayesian",
    "standardise_images",
]

Task = Literal["regression", "classification"]


def kernel3_convs(model: nn.Module) -> list[str]:
    """Qualified names of the 3x3x3 ``Conv3d`` layers (the sites of a 3x3x3 kernel prior)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv3d) and tuple(m.kernel_size) == (3, 3, 3)
    ]


def make_bayesian(
    model: nn.Module,
    prior: dwp.Prior | None = None,
    *,
    kernel_prior: dwp.Prior | None = None,
    estimator: str = "reparam",
    init: Literal["pretrained", "prior", "fresh"] = "pretrained",
    init_log_sigma: float | Literal["fan_in"] = "fan_in",
) -> nn.Module:
    """A Bayesian copy of ``model`` through :func:`dwp.bayesianize` (the U-Net's code path).

    Parameters
    ----------
    model
        Any network (BagNet3D, BaseRegressor, ...); left unchanged.
    prior
        Prior of every conv / linear layer not covered by ``kernel_prior``; default
        ``dwp.NormalPrior()`` (N(0, 1)).
    kernel_prior
        Prior of the 3x3x3 convs only, e.g. a :class:`dwp.DeepWeightPrior` fitted on
        3x3x3 kernels of source networks (``init="prior"`` starts them from its samples).
    estimator, init_log_sigma
        Passed to :func:`dwp.bayesianize`.
    init
        Initialisation of the layers under ``kernel_prior`` (the others keep their weights).
    """
    prior = dwp.NormalPrior() if prior is None else prior
    if kernel_prior is not None:
        names = kernel3_convs(model)
        if not names:
            raise ValueError(f"kernel_prior given but {type(model).__name__} has no 3x3x3 conv")
        model = dwp.bayesianize(
            model, kernel_prior, include=names, init=init,
            estimator=estimator, init_log_sigma=init_log_sigma,
        )  # fmt: skip
    # the Bayesian layers made above have no twin, so this converts only the rest
    return dwp.bayesianize(
        model,
        prior,
        estimator=estimator,
        init_log_sigma=init_log_sigma,
        inplace=kernel_prior is not None,
    )


@dataclass(frozen=True)
class HydraConfig:
    """Hydranet set-sum training: sets of ``set_size`` items, each zeroed with ``p_zero``.

    Attributes
    ----------
    set_size, p_zero
        Members per set (the paper's ``n`` branches, 4) and the probability that a member is
        replaced by a zero image (0.1).
    centre
        ``False``: targets only scaled (``y / sd``), so a set's target is the sum of its
        kept members' labels and a zero image must predict 0.  ``True``: targets centred
        like the base regressor's (``(y - mean) / sd``); a zero image then stands for an
        average subject (it must predict 0 in centred units, the training mean in target
        units), and the network keeps the base regressor's output scale.
    sets_per_step
        Sets per optimisation step (the loss is their mean); ``None``: ``batch_size //
        set_size``, at least one (the paper: one set of 4 per step).  Sets are cut from
        consecutive epochs when an epoch holds fewer.
    members_per_pass
        ``None``: all members of a step's sets in one forward pass (fastest); ``k``: ``k``
        members at a time, for volumes whose ``set_size`` copies do not fit in memory
        (:func:`~regression3d.hydranet.set_loss_backward`; same gradient).
    """

    set_size: int = 4
    p_zero: float = 0.1
    centre: bool = False
    sets_per_step: int | None = None
    members_per_pass: int | None = None

    def __post_init__(self) -> None:
        for name in ("sets_per_step", "members_per_pass"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`fit`.

    Attributes
    ----------
    steps, batch_size, lr, weight_decay
        Optimisation steps, images per step (Hydranet: ``batch_size // set_size`` sets, at
        least one), the means' learning rate and decoupled weight decay.
    optimizer
        ``"auto"``: ``"natural"`` for a Bayesian network (Adam on the means, natural-
        gradient steps on the posterior scales, :class:`dwp.optim.NaturalVI`), AdamW for a
        deterministic one; or ``"adam"`` / ``"sgd"`` (:func:`dwp.optim.build_optimizer`);
        or, for a deterministic network, ``"adadelta"`` (the Hydranet paper's optimiser;
        ``lr`` 1.0 is its usual rate).
    scale_rate
        ``natural``: the rate of the natural-gradient step on the scales.
    beta
        KL weight of the ELBO (Bayesian networks only).
    kl_warmup
        Steps of a log-linear warm-up of beta from ``beta * 1e-4`` (0: constant).
    scale_lr
        ``adam`` / ``sgd``: learning rate of the posterior log-sigmas
        (:func:`dwp.param_groups`).
    noise_scale
        Standard deviation of the Gaussian likelihood, in standardised target units.
    hydranet
        ``None`` for ordinary minibatches, or a :class:`HydraConfig`.
    seed
        Seed of the batches, the zero images and the weight samples.
    device
        Where to train (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), checked by
        :func:`fit` before any step (:func:`dwp.devices.resolve_device`).  The network is
        moved there; the images stay where they are and each batch is moved.  The batches
        and zero images are drawn on the CPU whatever the device; weight samples come from
        the device's generator (seeded with ``seed`` too).
    amp
        Mixed precision (:mod:`dwp.amp`): ``"bf16"`` (CPU, Ampere+ GPUs) or ``"fp16"``
        (CUDA, with a loss scale) runs the network's forward passes under autocast; the
        likelihood, the KL and the loss stay float32.  ``"off"`` (default): float32.
        Checked against ``device`` by :func:`fit` (``ValueError`` naming ``amp``).
    """

    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "auto"
    scale_rate: float = 0.1
    beta: float = 1.0
    kl_warmup: int = 0
    scale_lr: float | None = 1e-4
    noise_scale: float = 0.5
    hydranet: HydraConfig | None = None
    seed: int = 0
    device: str | torch.device = "cpu"
    amp: Literal["off", "bf16", "fp16"] = "off"

    def as_dict(self) -> dict:
        """The settings as plain values (``device`` as its string), e.g. for JSON."""
        return asdict(self) | {"device": str(self.device)}


@dataclass
class FittedModel:
    """A trained network with its target scaling.

    Attributes
    ----------
    model
        The network (eval mode), on the device it was trained on.
    task
        ``"regression"`` or ``"classification"``.
    shift, scale
        Regression targets were ``(y - shift) / scale`` in training, shape ``(K,)``, CPU
        tensors.
    history
        ``step``, ``loss``, ``nll``, ``kl`` every 10 steps.
    """

    model: nn.Module
    task: Task
    shift: Tensor
    scale: Tensor
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def bayesian(self) -> bool:
        return bool(dwp.bayesian_layers(self.model))

    def predict(
        self, x: Tensor, n_samples: int = 16, *, batch_size: int = 4
    ) -> tuple[Tensor, Tensor]:
        """Predictive mean and epistemic variance over posterior samples.

        Parameters
        ----------
        x
            ``(N, C, D, H, W)``, on any device: each batch is moved to the model's.
        n_samples
            Posterior samples (ignored by deterministic networks).
        batch_size
            Images per forward pass.

        Returns
        -------
        tuple of Tensor
            Regression: mean and variance ``(N, K)`` in target units.  Classification:
            class probabilities ``(N, C)`` and their variance over samples.  CPU tensors.
        """
        _check_images(x, "x")
        device = _device_of(self.model)
        means, variances = [], []
        for i in range(0, len(x), batch_size):
            batch = x[i : i + batch_size].to(device)
            pred = dwp.predict(self.model, batch, n_samples, task=self.task)
            means.append(pred.mean.cpu())
            variances.append(pred.variance.cpu())
        mean, variance = torch.cat(means), torch.cat(variances)
        if self.task == "regression":
            mean = mean * self.scale + self.shift
            variance = variance * self.scale**2
        return mean, variance


def _device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU for a module with none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_images(x: Tensor, name: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} must be (N, C, D, H, W), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values")


def _optimiser(
    model: nn.Module, config: TrainConfig, schedule: dwp.KLSchedule, bayesian: bool
) -> torch.optim.Optimizer:
    """``config.optimizer`` for ``model``; ``"auto"``: natural-gradient scales for a
    Bayesian network, AdamW (decoupled weight decay) for a deterministic one."""
    name = config.optimizer
    if name == "adadelta":
        if bayesian:
            raise ValueError(
                "optimizer 'adadelta' is for deterministic networks; a Bayesian one takes "
                "'auto', 'natural', 'adam' or 'sgd'"
            )
        return torch.optim.Adadelta(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
    if name == "auto" and not bayesian:
        return torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
    return dwp.optim.build_optimizer(
        "natural" if name == "auto" else name,
        model,
        config.lr,
        kl_weight=schedule,
        scale_rate=config.scale_rate,
        scale_lr=config.scale_lr,
        weight_decay=config.weight_decay,
    )


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig = TrainConfig(),
    *,
    task: Task = "regression",
    augment: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
    logger: TrainingLogger | None = None,
) -> FittedModel:
    """Train ``model`` (in place) on images ``x`` and image-level labels ``y``.

    Parameters
    ----------
    model
        ``(B, C, *spatial) -> (B, K)``; Bayesian if it holds :class:`dwp.BayesianLayer`\\ s.
    x
        ``(N, C, D, H, W)`` float images.
    y
        Regression: ``(N,)`` or ``(N, K)`` float targets.  Classification: ``(N,)`` integer
        classes.
    config
        :class:`TrainConfig`.
    task
        ``"regression"`` (Gaussian likelihood) or ``"classification"`` (categorical).
    augment
        Optional ``(B, C, *spatial) -> (B, C, *spatial)`` applied to each training batch.
    progress
        A tqdm bar over the steps.
    logger
        Receives every step's scalars at the step's 0-based number: ``train/loss``,
        ``train/nll`` (summed over the batch), ``train/data_term`` (the loss without the
        KL: ``nll * N / B`` for a Bayesian network), ``train/kl``, ``train/beta``,
        ``lr/<group>`` and, for a Bayesian network, ``posterior_log_sigma/<group>``.
        Flushed at the end, not closed (it belongs to the caller).

    Returns
    -------
    FittedModel
        ``model`` itself, moved to ``config.device``; ``shift`` and ``scale`` on the CPU.

    Raises
    ------
    ValueError
        Bad images or labels, an optimiser that does not fit the network, or a
        ``config.device`` this machine lacks (before the network is moved or trained).
    """
    device = resolve_device(config.device, name="device")
    check_precision(config.amp, device, "amp")
    _check_images(x, "x")
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    if config.hydranet is not None and task != "regression":
        raise ValueError("Hydranet set sums need additive regression targets")
    n = len(x)
    y = y.cpu()  # labels are tiny: scaled on the CPU (FittedModel keeps shift, scale there)
    if task == "regression":
        y = y.reshape(n, -1).to(x.dtype)
        if not torch.isfinite(y).all():
            raise ValueError("y holds NaN or inf values")
        uncentred = config.hydranet is not None and not config.hydranet.centre
        shift = torch.zeros(y.shape[1], dtype=x.dtype) if uncentred else y.mean(0)
        scale = (y.std(0) if n > 1 else torch.ones(y.shape[1])).clamp_min(1e-8).to(x.dtype)
        z = (y - shift) / scale
    else:
        if y.dtype.is_floating_point:
            raise ValueError("classification labels y must be integers")
        shift, scale, z = torch.zeros(1), torch.ones(1), y.long()

    # before the optimiser is built: it must hold the parameters that will be trained
    model.to(device)
    bayesian = bool(dwp.bayesian_layers(model))
    schedule = (
        dwp.KLSchedule(
            "log_linear", start=config.beta * 1e-4, end=config.beta, steps=config.kl_warmup
        )
        if config.kl_warmup > 0 and config.beta > 0
        else dwp.KLSchedule("constant", end=config.beta)
    )
    optimiser = _optimiser(model, config, schedule, bayesian)
    guard_cpu_bf16_conv3d(model, config.amp, device)  # a torch defect, refused (dwp.amp)
    scaler = grad_scaler(config.amp, device)  # fp16's loss scale; a pass-through otherwise
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []

    def nll_of(out: Tensor, target: Tensor) -> Tensor:
        if task == "classification":
            return dwp.likelihoods.categorical_nll(out, target)
        return dwp.likelihoods.gaussian_nll(out, target, config.noise_scale)

    batches = _batches(n, config, generator)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        for step in tqdm(range(config.steps), desc="fit", disable=not progress):
            optimiser.zero_grad(set_to_none=True)
            beta = schedule(step)
            if config.hydranet is None:
                idx = next(batches)
                # only the batch moves: the dataset may not fit on the device
                xb = x[idx].to(device)
                xb = xb if augment is None else augment(xb)
                with autocast(config.amp, device):
                    out = model(xb)
                nll = nll_of(out.float(), z[idx].to(device))
                if bayesian:
                    terms = dwp.elbo(nll, model, n_data=n, batch_size=len(idx), beta=beta)
                    loss, kl, data_term = terms.loss, terms.kl, terms.data_term
                else:
                    loss, kl = nll / len(idx), torch.zeros((), device=device)
                    data_term = loss
                scaler.scale(loss).backward()
            else:
                sets = next(batches)
                members = [m.to(device) for m in set_members(x, sets)]
                if augment is not None:
                    members = [augment(m) for m in members]
                n_sets = -(-n // config.hydranet.set_size)
                factor = n_sets / len(sets) if bayesian else 1.0 / len(sets)
                nll, _ = set_loss_backward(
                    model,
                    members,
                    set_targets(z, sets).to(device),
                    lambda s, t, f=factor: scaler.scale(nll_of(s, t) * f),
                    members_per_pass=config.hydranet.members_per_pass,
                    precision=config.amp,
                )
                nll = nll / scaler.get_scale() / factor
                kl = dwp.kl(model) if bayesian else torch.zeros((), device=device)
                if bayesian:
                    scaler.scale(beta * kl).backward()
                data_term = nll * factor
                loss = data_term + beta * kl.detach()
            if logger is not None:  # before the step: the scales this loss was computed with
                values = {"loss": loss, "nll": nll, "data_term": data_term, "kl": kl}
                logged = {k: v.item() for k, v in values.items()} | {"beta": beta}
                logger.log_scalars(step, step_scalars(logged, model, optimiser))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"training loss is {loss.item()} at step {step}: lower lr or check the data"
                )
            scaler.step(optimiser)  # skipped when fp16 gradients overflowed
            scaler.update()
            if step % 10 == 0 or step == config.steps - 1:
                history.append(
                    {
                        "step": step,
                        "loss": loss.item(),
                        "nll": nll.item(),
                        "kl": kl.item(),
                        "beta": beta,
                    }
                )
    model.eval()
    if logger is not None:
        logger.flush()
    return FittedModel(model, task, shift, scale, history)


def _batches(n: int, config: TrainConfig, generator: torch.Generator):
    """Endless minibatches: index tensors (without replacement within an epoch) or
    :class:`~regression3d.hydranet.SetBatch` es of Hydranet sets."""
    hydra = config.hydranet
    if hydra is None:
        size = min(config.batch_size, n)
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n - size + 1, size):
                yield order[i : i + size]
    else:
        per_step = hydra.sets_per_step or max(1, config.batch_size // hydra.set_size)
        pending: list[SetBatch] = []
        while True:
            pending.append(draw_sets(n, hydra.set_size, hydra.p_zero, generator=generator))
            while sum(len(s) for s in pending) >= per_step:
                pool = SetBatch(
                    torch.cat([s.index for s in pending]), torch.cat([s.keep for s in pending])
                )
                yield pool[:per_step]
                pending = [pool[per_step:]] if len(pool) > per_step else []


def standardise_images(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Z-score each image (inside ``mask`` if given): ``(N, C, *spatial)`` float."""
    dims = tuple(range(2, x.dim()))
    if mask is None:
        mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    else:
        m = mask.to(x.dtype).expand_as(x)
        count = m.sum(dims, keepdim=True).clamp_min(1)
        mean = (x * m).sum(dims, keepdim=True) / count
        std = (((x - mean) * m).pow(2).sum(dims, keepdim=True) / count).sqrt()
    return (x - mean) / std.clamp_min(1e-8)
