"""Bayesian layers with a mean-field Gaussian posterior over their weights.

One implementation (:class:`BayesianLayer`) serves every layer type; the public classes
are thin subclasses of their torch twins (``BayesConv3d`` *is an* ``nn.Conv3d``), so they
take the same constructor arguments with the same defaults, plus keyword-only Bayesian
options.

Parameterisation
----------------
``weight`` (and ``bias``) hold the **posterior mean**, so torch initialisers, code that
reads ``layer.weight`` and export to a deterministic network work unchanged.
``weight_log_sigma`` holds the log standard deviation.  By default
(``init_log_sigma="fan_in"``) it starts at ``sigma = 0.1 * sqrt(2 / fan_in)``, a tenth of
the He-initialised weights' standard deviation: the weight noise then adds about 10 % to
the spread of each pre-activation, whatever the layer's width (a constant misfits layers
of different fan-in: -5, the value of both reference implementations of the deep weight
prior, is 10 % for a 3x3x3 conv of 16 channels and 20 % for one of 64).  The noise is
small enough not to disturb a pretrained network and large enough for the gradient of the
scales to carry information; the optimiser then moves it (:class:`dwp.optim.NaturalVI`).
A number sets ``log sigma`` itself.  The log parameterisation makes the Gaussian entropy
linear in the parameter.

The bias is deterministic unless ``bayesian_bias=True``; a Bayesian bias gets
``bias_log_sigma`` and ``bias_prior`` (default N(0, 1)).
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .posterior import MeanFieldNormal, reparam_sample
from .priors import NormalPrior, Prior
from .settings import Estimator, Mode, global_estimator, global_mode, validation_enabled

__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "BayesLinear",
    "BayesianLayer",
    "NonFinitePosteriorError",
    "bayesian_twin",
    "check_posteriors",
]

#: The default initial posterior scale: a fraction of the He standard deviation (see above).
DEFAULT_INIT_LOG_SIGMA = "fan_in"
#: ``init_log_sigma="fan_in"``: sigma = INIT_NOISE * sqrt(2 / fan_in).
INIT_NOISE = 0.1

InitLogSigma = float | Literal["fan_in"]


class NonFinitePosteriorError(FloatingPointError):
    """A posterior parameter became NaN or infinite (usually a diverged optimiser)."""


# -- the posterior finiteness check, without a synchronisation per layer ------------------
#: Deferred checks kept before they are read regardless: bounds the memory and the delay of
#: a loop that never reaches :func:`check_posteriors` (one synchronisation per this many
#: layer calls).
MAX_DEFERRED_CHECKS = 256
_deferred: list[tuple[Tensor, str, tuple[str, ...]]] = []
_deferred_lock = threading.Lock()


def _defers_check(device: torch.device) -> bool:
    """Whether a layer on ``device`` queues its finiteness check instead of reading it.

    Reading a CPU tensor costs nothing; reading a GPU one waits for every queued kernel and
    leaves the device idle while the host launches the next, once per parameter per layer."""
    return device.type != "cpu"


def check_posteriors() -> None:
    """Read the finiteness checks that Bayesian layers queued on an accelerator, and raise
    :class:`NonFinitePosteriorError` naming the first layer and parameter that were NaN or
    infinite in a forward pass since the last call (a no-op when nothing is queued).

    On a CPU each layer checks its posterior in its own forward pass.  On a GPU that would
    synchronise host and device once per parameter of every layer, so the layer queues the
    check's result on the device instead, and it is read here, at the next point where the
    step synchronises anyway: :func:`dwp.elbo` (before the ELBO's own check, so no gradient
    is taken) and :func:`dwp.predict` call it, and a layer calls it itself every
    :data:`MAX_DEFERRED_CHECKS` forward passes.  Call it after a forward pass of your own
    training loop to get the error there.
    """
    with _deferred_lock:
        if not _deferred:
            return
        pending = _deferred[:]
        _deferred.clear()
    by_device: dict[torch.device, list[int]] = {}
    for i, (flags, _, _) in enumerate(pending):
        by_device.setdefault(flags.device, []).append(i)
    bad = set()
    for indices in by_device.values():  # one read per device
        ok = torch.stack([pending[i][0].all() for i in indices]).cpu()
        bad.update(i for i, fine in zip(indices, ok.tolist(), strict=True) if not fine)
    if bad:
        flags, layer, names = pending[min(bad)]
        first = names[int((~flags).nonzero()[0])]
        raise NonFinitePosteriorError(_non_finite_message(layer, first))


def _non_finite_message(layer: str, parameter: str) -> str:
    return (
        f"layer {layer}: posterior parameter {parameter!r} has non-finite values; lower the "
        "learning rate or the initial scale, or check the data for NaNs"
    )


def _resolve_init_log_sigma(init_log_sigma: InitLogSigma, weight: Tensor) -> float:
    """The initial ``log sigma`` of a layer with this weight: a number as it is, ``"fan_in"``
    as ``log(INIT_NOISE * sqrt(2 / fan_in))`` (fan-in as torch's initialisers count it)."""
    if isinstance(init_log_sigma, str):
        if init_log_sigma != "fan_in":
            raise ValueError(f"init_log_sigma must be a number or 'fan_in', got {init_log_sigma!r}")
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])
        return math.log(INIT_NOISE * math.sqrt(2.0 / max(fan_in, 1)))
    value = float(init_log_sigma)
    if not math.isfinite(value):
        raise ValueError(f"init_log_sigma must be finite, got {value}")
    return value


class BayesianLayer(nn.Module):
    """The Bayesian behaviour shared by every layer in :mod:`dwp.nn`.

    Not instantiated directly: mixed in front of a torch layer class, whose functional
    operation each subclass exposes as :meth:`_op`.

    Keyword-only parameters (after the torch twin's own)
    ----------------------------------------------------
    prior
        Prior over ``weight`` (a :class:`dwp.priors.Prior`); default ``NormalPrior()``.
    bias_prior
        Prior over a Bayesian bias; default ``NormalPrior()``.
    bayesian_bias
        Give the bias a posterior too (default: deterministic bias).
    init_log_sigma
        Initial log standard deviation of every weight: a number, or ``"fan_in"`` (the
        default) for ``log(0.1 * sqrt(2 / fan_in))``, see the module notes.
    estimator
        ``"reparam"`` (default), ``"local_reparam"`` or ``"flipout"``.
    mode
        ``"auto"`` (default: sample in training, mean in eval), ``"sample"`` or ``"mean"``.
    """

    #: number of trailing weight dimensions that form one spatial kernel
    kernel_dims: int = 0
    #: dimension of the input that holds channels / features (for flipout's sign vectors)
    _channel_dim: int = 1
    #: the deterministic torch class this layer mirrors
    torch_twin: type[nn.Module]

    def __init__(
        self,
        *args: Any,
        prior: Prior | None = None,
        bias_prior: Prior | None = None,
        bayesian_bias: bool = False,
        init_log_sigma: InitLogSigma = DEFAULT_INIT_LOG_SIGMA,
        estimator: Estimator | str = Estimator.REPARAM,
        mode: Mode | str = Mode.AUTO,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.init_log_sigma = _resolve_init_log_sigma(init_log_sigma, self.weight)
        self.estimator = Estimator(estimator)
        self.mode = Mode(mode)
        self.site_name = type(self).__name__
        self.weight_log_sigma = nn.Parameter(torch.full_like(self.weight, self.init_log_sigma))
        self.bayesian_bias = bool(bayesian_bias) and self.bias is not None
        if self.bayesian_bias:
            self.bias_log_sigma = nn.Parameter(torch.full_like(self.bias, self.init_log_sigma))
        else:
            self.register_parameter("bias_log_sigma", None)
        self.set_prior(prior, bias_prior)

    # -- posterior ---------------------------------------------------------------------
    def reset_parameters(self) -> None:
        super().reset_parameters()  # the torch twin's initialisation of the mean
        if getattr(self, "weight_log_sigma", None) is not None:
            with torch.no_grad():
                self.weight_log_sigma.fill_(self.init_log_sigma)
                if self.bias_log_sigma is not None:
                    self.bias_log_sigma.fill_(self.init_log_sigma)

    @property
    def weight_posterior(self) -> MeanFieldNormal:
        """q(weight) as a :class:`MeanFieldNormal` view (gradients reach this layer).

        Its ``sample`` is the weight of the last forward pass while the parameters are
        unchanged and the prior shares samples (see :meth:`sample_weight`), else ``None``.
        """
        return MeanFieldNormal(
            self.weight,
            self.weight_log_sigma,
            f"{self.site_name}.weight",
            self.kernel_dims,
            sample=self._shared_weight_sample(),
        )

    def sample_weight(self) -> Tensor:
        """A reparameterised weight sample ``mu + sigma * eps`` (the ``reparam`` forward's).

        When the weight prior estimates its KL by Monte Carlo from weight samples
        (``prior.shares_weight_sample``, e.g. the deep weight prior), the sample is also
        remembered, with the parameters' versions, and the KL uses it instead of drawing
        its own until the parameters change (an optimiser step) or the next sample: each
        training step then draws the weights once.  Only samples that carry gradients are
        remembered, in a side table, so ``copy.deepcopy`` and pickling see nothing of them.
        """
        weight = reparam_sample(self.weight, self.weight_log_sigma)
        if self.weight_prior.shares_weight_sample and weight.requires_grad:
            _SHARED_SAMPLES[self] = _SharedSample(
                weight,
                self.weight,
                self.weight._version,
                self.weight_log_sigma,
                self.weight_log_sigma._version,
            )
        return weight

    def _shared_weight_sample(self) -> Tensor | None:
        """The remembered weight sample if the parameters have not changed since; a stale
        one is dropped (it would hold a weight-sized tensor until the next forward)."""
        record = _SHARED_SAMPLES.get(self)
        if record is None:
            return None
        if (
            record.loc is self.weight
            and record.log_scale is self.weight_log_sigma
            and record.loc._version == record.loc_version
            and record.log_scale._version == record.log_scale_version
        ):
            return record.sample
        del _SHARED_SAMPLES[self]
        return None

    @property
    def bias_posterior(self) -> MeanFieldNormal | None:
        """q(bias), or ``None`` when the bias is deterministic or absent."""
        if not self.bayesian_bias:
            return None
        return MeanFieldNormal(self.bias, self.bias_log_sigma, f"{self.site_name}.bias", 0)

    def set_prior(self, prior: Prior | None = None, bias_prior: Prior | None = None) -> None:
        """Attach priors (templates are bound to this layer's current weights).

        Raises :class:`dwp.priors.PriorMismatchError` naming the layer when the prior does
        not fit, e.g. a 3x3 kernel prior on a 3x3x3 conv.
        """
        prior = NormalPrior() if prior is None else prior
        self.weight_prior = prior.for_site(
            f"{self.site_name}.weight", self.weight.detach(), self.kernel_dims
        )
        if self.bayesian_bias:
            bias_prior = NormalPrior() if bias_prior is None else bias_prior
            self.bias_prior = bias_prior.for_site(f"{self.site_name}.bias", self.bias.detach(), 0)
        else:
            self.bias_prior = None

    def sites(self) -> list[tuple[Prior, MeanFieldNormal]]:
        """``(prior, posterior)`` of every Bayesian parameter: the weight, and the bias when
        it is Bayesian."""
        sites = [(self.weight_prior, self.weight_posterior)]
        if self.bayesian_bias:
            sites.append((self.bias_prior, self.bias_posterior))
        return sites

    def kl(self) -> Tensor:
        """KL(q || p) of this layer (exact or an upper bound, as the priors say), summed."""
        return torch.stack([prior.kl(posterior) for prior, posterior in self.sites()]).sum()

    # -- forward -----------------------------------------------------------------------
    def _op(
        self, input: Tensor, weight: Tensor, bias: Tensor | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        """The torch twin's functional operation with the given weight and bias."""
        raise NotImplementedError

    def effective_mode(self) -> Mode:
        """``SAMPLE`` or ``MEAN``, after thread-wide overrides and train/eval."""
        mode = global_mode() or self.mode
        if mode is Mode.AUTO:
            return Mode.SAMPLE if self.training else Mode.MEAN
        return mode

    def effective_estimator(self) -> Estimator:
        return global_estimator() or self.estimator

    def _check_finite(self) -> None:
        """Raise :class:`NonFinitePosteriorError` for a NaN or infinite posterior parameter;
        on an accelerator, queue the check for :func:`check_posteriors` instead."""
        named = [
            (name, value)
            for name in ("weight", "weight_log_sigma", "bias", "bias_log_sigma")
            if (value := getattr(self, name)) is not None
        ]
        layer = f"{self.site_name!r} ({type(self).__name__})"
        if not _defers_check(self.weight.device):
            for name, value in named:
                if not torch.isfinite(value).all():
                    raise NonFinitePosteriorError(_non_finite_message(layer, name))
            return
        flags = torch.stack([torch.isfinite(value).all() for _, value in named])
        with _deferred_lock:
            _deferred.append((flags, layer, tuple(name for name, _ in named)))
            full = len(_deferred) >= MAX_DEFERRED_CHECKS
        if full:
            check_posteriors()

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if validation_enabled():
            self._check_finite()
        if self.effective_mode() is Mode.MEAN:
            return self._op(input, self.weight, self.bias, *args, **kwargs)
        estimator = self.effective_estimator()
        if estimator is Estimator.REPARAM:
            return self._forward_reparam(input, *args, **kwargs)
        if estimator is Estimator.LOCAL_REPARAM:
            return self._forward_local_reparam(input, *args, **kwargs)
        return self._forward_flipout(input, *args, **kwargs)

    def _sample_bias(self) -> Tensor | None:
        if not self.bayesian_bias:
            return self.bias
        return self.bias + self.bias_log_sigma.exp() * torch.randn_like(self.bias)

    def _forward_reparam(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._op(input, self.sample_weight(), self._sample_bias(), *args, **kwargs)

    def _forward_local_reparam(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        mean = self._op(input, self.weight, self.bias, *args, **kwargs)
        bias_var = (2.0 * self.bias_log_sigma).exp() if self.bayesian_bias else None
        weight_var = (2.0 * self.weight_log_sigma).exp()
        var = self._op(input.square(), weight_var, bias_var, *args, **kwargs)
        return _GaussianNoise.apply(mean, var)

    def _signs(self, input: Tensor, channels: int) -> Tensor:
        """Random ±1 of one value per example and channel, broadcastable over space."""
        if self.kernel_dims == 0:  # dense: every row of the leading dims is an example
            shape = (*input.shape[:-1], channels)
        elif input.dim() == self.kernel_dims + 2:  # batched conv input (B, C, *spatial)
            shape = (input.shape[0], channels) + (1,) * self.kernel_dims
        else:  # unbatched conv input (C, *spatial)
            shape = (channels,) + (1,) * self.kernel_dims
        return torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(0.5) * 2 - 1

    def _forward_flipout(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        mean = self._op(input, self.weight, self.bias, *args, **kwargs)
        delta = self.weight_log_sigma.exp() * torch.randn_like(self.weight)
        in_channels = (
            input.shape[-1] if self.kernel_dims == 0 else input.shape[-1 - self.kernel_dims]
        )
        sign_in = self._signs(input, in_channels)
        out_channels = (
            mean.shape[-1] if self.kernel_dims == 0 else mean.shape[-1 - self.kernel_dims]
        )
        sign_out = self._signs(input, out_channels)
        out = mean + self._op(input * sign_in, delta, None, *args, **kwargs) * sign_out
        if self.bayesian_bias:
            noise = self._signs(input, out_channels).normal_()  # independent per example
            shape = (-1,) + (1,) * self.kernel_dims
            out = out + noise * self.bias_log_sigma.exp().view(shape)
        return out

    def extra_repr(self) -> str:
        text = super().extra_repr()
        extras = f"estimator={self.estimator.value}, mode={self.mode.value}"
        if self.bayesian_bias:
            extras += ", bayesian_bias=True"
        return f"{text}, {extras}"


class _SharedSample(NamedTuple):
    """A layer's last weight sample and the parameters (objects and versions) it came from."""

    sample: Tensor
    loc: Tensor
    loc_version: int
    log_scale: Tensor
    log_scale_version: int


#: layer -> its last weight sample, for priors that share samples (BayesianLayer.sample_weight)
_SHARED_SAMPLES: weakref.WeakKeyDictionary[nn.Module, _SharedSample] = weakref.WeakKeyDictionary()


class _GaussianNoise(torch.autograd.Function):
    """``mean + sqrt(var) * eps`` with ``eps ~ N(0, 1)``, fused for memory and speed.

    Autograd would keep ``var``, ``sqrt(var)``, the clamp mask and ``eps`` (four tensors the
    size of the layer's output) and run five elementwise kernels each way; this keeps
    ``eps`` and ``0.5 / sqrt(var)`` and allocates as little as it can (on CPU, large
    temporaries cost page faults as much as arithmetic).  ``var`` is a sum of non-negative
    terms but is exactly 0 where the input is (e.g. a ReLU-dead patch); there
    ``d sqrt(var) / d var`` is infinite and the gradient is set to 0.
    """

    @staticmethod
    def forward(ctx, mean: Tensor, var: Tensor) -> Tensor:
        std = var.clamp_min(0.0).sqrt_()
        eps = torch.randn_like(mean)
        out = torch.addcmul(mean, std, eps)
        half_inv_std = std.reciprocal_().mul_(0.5).nan_to_num_(posinf=0.0)  # reuses std
        ctx.save_for_backward(eps, half_inv_std)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        eps, half_inv_std = ctx.saved_tensors
        return grad, (grad * eps).mul_(half_inv_std)


# -- the concrete layers ---------------------------------------------------------------
class _ConvMixin:
    def _op(self, input, weight, bias, *args, **kwargs):
        return self._conv_forward(input, weight, bias)


class _ConvTransposeMixin:
    _functional: ClassVar[dict] = {
        1: F.conv_transpose1d,
        2: F.conv_transpose2d,
        3: F.conv_transpose3d,
    }

    def _op(self, input, weight, bias, output_size=None):
        output_padding = self._output_padding(
            input,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            self.kernel_dims,
            self.dilation,
        )
        return self._functional[self.kernel_dims](
            input,
            weight,
            bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class _LinearMixin:
    def _op(self, input, weight, bias, *args, **kwargs):
        return F.linear(input, weight, bias)


def _with_torch_signature(cls: type) -> type:
    """Expose ``torch_twin``'s constructor signature plus the Bayesian keyword arguments."""
    torch_params = list(inspect.signature(cls.torch_twin.__init__).parameters.values())[1:]
    bayes_params = [
        p
        for p in inspect.signature(BayesianLayer.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    cls.__signature__ = inspect.Signature(torch_params + bayes_params)
    return cls


@_with_torch_signature
class BayesConv1d(_ConvMixin, BayesianLayer, nn.Conv1d):
    """Bayesian twin of :class:`torch.nn.Conv1d`; input ``(B, C_in, L)``."""

    torch_twin = nn.Conv1d
    kernel_dims = 1


@_with_torch_signature
class BayesConv2d(_ConvMixin, BayesianLayer, nn.Conv2d):
    """Bayesian twin of :class:`torch.nn.Conv2d`; input ``(B, C_in, H, W)``."""

    torch_twin = nn.Conv2d
    kernel_dims = 2


@_with_torch_signature
class BayesConv3d(_ConvMixin, BayesianLayer, nn.Conv3d):
    """Bayesian twin of :class:`torch.nn.Conv3d`; input ``(B, C_in, D, H, W)``."""

    torch_twin = nn.Conv3d
    kernel_dims = 3


@_with_torch_signature
class BayesConvTranspose1d(_ConvTransposeMixin, BayesianLayer, nn.ConvTranspose1d):
    """Bayesian twin of :class:`torch.nn.ConvTranspose1d`."""

    torch_twin = nn.ConvTranspose1d
    kernel_dims = 1


@_with_torch_signature
class BayesConvTranspose2d(_ConvTransposeMixin, BayesianLayer, nn.ConvTranspose2d):
    """Bayesian twin of :class:`torch.nn.ConvTranspose2d`."""

    torch_twin = nn.ConvTranspose2d
    kernel_dims = 2


@_with_torch_signature
class BayesConvTranspose3d(_ConvTransposeMixin, BayesianLayer, nn.ConvTranspose3d):
    """Bayesian twin of :class:`torch.nn.ConvTranspose3d`."""

    torch_twin = nn.ConvTranspose3d
    kernel_dims = 3


@_with_torch_signature
class BayesLinear(_LinearMixin, BayesianLayer, nn.Linear):
    """Bayesian twin of :class:`torch.nn.Linear`; input ``(*, in_features)``."""

    torch_twin = nn.Linear
    kernel_dims = 0


_TWINS: dict[type[nn.Module], type[BayesianLayer]] = {
    cls.torch_twin: cls
    for cls in (
        BayesConv1d,
        BayesConv2d,
        BayesConv3d,
        BayesConvTranspose1d,
        BayesConvTranspose2d,
        BayesConvTranspose3d,
        BayesLinear,
    )
}


def bayesian_twin(module_type: type[nn.Module]) -> type[BayesianLayer] | None:
    """The Bayesian class for a torch layer class, or ``None`` if there is none.

    Only exact torch classes are matched: a user subclass may change ``forward`` and is not
    silently replaced.
    """
    return _TWINS.get(module_type)
