"""The source-trajectory (SWAG) prior: a low-rank-plus-diagonal Gaussian per layer.

"Pre-Train Your Loss" (Shwartz-Ziv et al., NeurIPS 2022) turns the SWA moments of a source
network's training trajectory (Maddox et al. 2019; collected by :class:`dwp.SWAGMoments`)
into the prior of the target task, rescaled by a factor: for a layer with ``d`` weights,

    p(w) = N(w | mu, c (A + U U^T)),    A = diag(a),  U in R^(d x r),

with ``mu`` the running mean of the source weights, ``a`` their variance along the
trajectory, ``U`` the last ``K <= r`` deviations from the running mean as columns,
``c`` the ``scale`` (times ``exp(2 log_scale_factor)`` when the scale is learned).  As in
SWAG, ``A = diag(var) / 2`` and ``U = D / sqrt(2 (K - 1))`` (the average of a diagonal and
a low-rank estimate of the covariance); with rank 0, ``A = diag(var)`` (SWAG-diagonal).

The prior of each layer is the marginal of SWAG's whole-network Gaussian for that layer's
weights (the rows of ``mu``, ``a`` and ``U``), and the layers are independent a priori:
correlations *between* layers are dropped.  A whole-network prior would keep them: its KL
does not split into per-layer terms, but it can be assembled from per-layer pieces, so the
existing :meth:`~dwp.priors.Prior.batch_key` / :meth:`~dwp.priors.Prior.kl_batch` hook
could give it (every site of the network returns one key; ``kl_batch`` adds the layers'
``r``-vectors ``U_l^T A_l^-1 delta_l`` and ``r x r`` matrices ``U_l^T A_l^-1 U_l`` and
solves once).  ``sample`` and ``log_prob`` could not: they are called layer by layer, and
a joint draw needs the low-rank noise ``e2`` shared by every layer of one network, an
interface for drawing (or scoring) all of a network's weights at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..normal import LOG_2PI
from ..posterior import MeanFieldNormal
from .base import KLKind, Prior, PriorMismatchError

__all__ = ["SWAGPrior", "SWAGSitePrior", "SWAGStatistics", "lowrank_gaussian_kl"]

Shape = tuple[int, ...]


class SWAGStatistics(Protocol):
    """What :meth:`SWAGPrior.from_moments` reads (implemented by :class:`dwp.SWAGMoments`).

    ``layers`` maps qualified layer names to weight shapes; ``mean(name)`` and
    ``variance(name)`` have the layer's shape, ``deviations(name)`` is ``(K, *shape)``
    with ``K = min(n_snapshots, rank)`` columns of ``w_i - mean_i``, oldest first.
    """

    layers: Mapping[str, torch.Size]
    rank: int
    n_snapshots: int

    def mean(self, name: str) -> Tensor: ...

    def variance(self, name: str) -> Tensor: ...

    def deviations(self, name: str) -> Tensor: ...


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


class _Precision(NamedTuple):
    """``Sigma0^-1`` and ``log |Sigma0|`` of ``Sigma0 = A + U U^T``, from its ``r x r``
    capacitance ``C = I + U^T A^-1 U = L L^T`` (Woodbury, the matrix determinant lemma)::

        Sigma0^-1    = A^-1 - V V^T,   V = A^-1 U L^-T
        log |Sigma0| = log |C| + sum_i log a_i

    None of it depends on the posterior: a site prior computes it once (:meth:`of`).
    """

    inv_diag: Tensor  # 1 / a_i, (d,)
    diag: Tensor  # (Sigma0^-1)_ii = 1 / a_i - |V_i|^2, (d,)
    root: Tensor  # V, (d, r)
    logdet: Tensor  # log |Sigma0|, a scalar

    @classmethod
    def of(cls, diag: Tensor, factor: Tensor, dtype: torch.dtype) -> _Precision:
        """From ``a`` ``(d,)`` and ``U`` ``(d, r)`` (``r`` may be 0), as ``dtype``.

        Computed in float64: ``(Sigma0^-1)_ii`` is a difference that float32 would round
        where ``U``'s row dwarfs ``a_i``.
        """
        a, u = diag.detach().double(), factor.detach().double()
        w = u / a.unsqueeze(1)  # A^-1 U
        eye = torch.eye(u.shape[1], dtype=a.dtype, device=a.device)
        chol = torch.linalg.cholesky(eye + u.T @ w)
        root = torch.linalg.solve_triangular(chol, w.T, upper=False).T  # W L^-T
        inv = a.reciprocal()
        logdet = 2.0 * chol.diagonal().log().sum() + a.log().sum()
        return cls(*(t.to(dtype) for t in (inv, inv - root.square().sum(1), root, logdet)))

    def quadratic(self, delta: Tensor, variance: Tensor | None = None) -> Tensor:
        """``delta_n^T Sigma0^-1 delta_n (+ tr(Sigma0^-1 diag(variance)))`` per row of
        ``delta`` ``(n, d)``; returns ``(n,)``.  O(n d r)::

            delta^T Sigma0^-1 delta = sum_i delta_i^2 / a_i - |V^T delta|^2
            tr(Sigma0^-1 S)         = sum_i variance_i (Sigma0^-1)_ii
        """
        total = (delta.square() * self.inv_diag).sum(-1) - (delta @ self.root).square().sum(-1)
        if variance is not None:
            total = total + (variance * self.diag).sum()
        return total


def _kl(posterior: MeanFieldNormal, loc: Tensor, precision: _Precision, log_c: Tensor) -> Tensor:
    """:func:`lowrank_gaussian_kl` with ``Sigma0``'s precision computed already."""
    log_scale = posterior.log_scale.reshape(-1)
    delta = (posterior.loc.reshape(-1) - loc.reshape(-1).to(log_scale.dtype)).unsqueeze(0)
    quadratic = precision.quadratic(delta, torch.exp(2.0 * log_scale))[0]
    d = delta.shape[1]
    return 0.5 * (
        quadratic * torch.exp(-log_c) - d + d * log_c + precision.logdet - 2.0 * log_scale.sum()
    )


def lowrank_gaussian_kl(
    posterior: MeanFieldNormal, loc: Tensor, diag: Tensor, factor: Tensor, log_c: Tensor
) -> Tensor:
    """KL(N(m, diag(s^2)) || N(mu, c (A + U U^T))), exact, in O(d r^2).

    With ``delta = m - mu``, ``Sigma0 = A + U U^T`` and its capacitance
    ``C = I_r + U^T A^-1 U = L L^T``::

        KL = 1/2 [ (tr(Sigma0^-1 S) + delta^T Sigma0^-1 delta) / c - d + d log c
                   + log |Sigma0| - sum_i log s_i^2 ]
        Sigma0^-1 = A^-1 - V V^T,  V = A^-1 U L^-T           (Woodbury)
        tr(Sigma0^-1 S) = sum_i s_i^2 (1 / a_i - |V_i|^2)
        delta^T Sigma0^-1 delta = sum_i delta_i^2 / a_i - |V^T delta|^2
        log |Sigma0| = log |C| + sum_i log a_i               (matrix determinant lemma)

    The dense ``d x d`` covariance is never formed: ``V`` costs O(d r^2), each term O(d r).

    Parameters
    ----------
    posterior
        ``q``: ``loc`` ``m`` and ``log_scale`` ``log s`` of any shape with ``d`` elements.
    loc, diag, factor
        ``mu`` (``d`` elements), ``a`` ``(d,)``, ``U`` ``(d, r)``.
    log_c
        ``log c``, a scalar tensor (differentiable: the learned scale).

    Returns
    -------
    Tensor
        The KL summed over the site (a scalar).
    """
    return _kl(posterior, loc, _Precision.of(diag, factor, posterior.loc.dtype), log_c)


def _allocate(prior: Prior, loc_shape: Shape, rank: int, scale: float, learn_scale: bool) -> None:
    """Check and set the options shared by the template and its site priors, and register
    the buffers a state dict fills: ``loc`` (``loc_shape``), ``diag`` ``(d,)`` and
    ``factor`` ``(d, rank)``."""
    if isinstance(rank, bool) or int(rank) != rank or rank < 0:
        raise ValueError(f"SWAGPrior needs an integer rank >= 0, got {rank!r}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"SWAGPrior needs a finite scale > 0, got {scale!r}")
    prior.rank, prior.scale, prior.learn_scale = int(rank), float(scale), bool(learn_scale)
    d = _numel(loc_shape)
    prior.register_buffer("loc", torch.zeros(loc_shape))
    prior.register_buffer("diag", torch.ones(d))
    prior.register_buffer("factor", torch.zeros(d, prior.rank))
    prior.metadata = {}


class SWAGSitePrior(Prior):
    """The SWAG prior of one layer: ``N(mu, c (A + U U^T))`` over its ``d`` weights.

    Made by :meth:`SWAGPrior.for_site` (through :func:`dwp.bayesianize`); the constructor
    allocates the buffers (``loc`` of the layer's shape, ``diag`` ``(d,)``, ``factor``
    ``(d, rank)``) that a state dict or the template fills.

    Parameters
    ----------
    name
        The site (``"encoder.0.conv.weight"``), for messages and the file.
    shape
        The weight's shape.
    rank
        Columns of ``U``.
    scale
        ``c``: the covariance's factor ("prior scale" of Pre-Train Your Loss).
    learn_scale
        Empirical Bayes: a scalar parameter ``log_scale_factor`` (0 at start) multiplies the
        standard deviations by ``exp(log_scale_factor)`` on top of ``scale``, and the ELBO's
        gradient learns it (:meth:`closed_form_log_scale` gives its optimum).
    """

    kl_kind = KLKind.EXACT

    def __init__(
        self,
        name: str,
        shape: Sequence[int],
        rank: int,
        *,
        scale: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        self.name, self.shape = str(name), tuple(int(s) for s in shape)
        _allocate(self, self.shape, rank, scale, learn_scale)
        # registered only when learned, as the other Gaussian priors do (dwp.empirical_bayes_
        # finds the sites whose prior has one)
        factor = nn.Parameter(torch.zeros(())) if self.learn_scale else None
        self.register_parameter("log_scale_factor", factor)
        self._cached: tuple[tuple, _Precision] | None = None

    def _precision(self, dtype: torch.dtype) -> _Precision:
        """``Sigma0``'s precision, recomputed only when ``diag`` or ``factor`` change
        (loaded, moved, edited in place: their storage or version counter changes)."""
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.diag, self.factor))
        key += (dtype,)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, _Precision.of(self.diag, self.factor, dtype))
        return self._cached[1]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SWAGSitePrior:
        self._cached = None  # moved or cast: new buffers, whose storage may reuse the old
        return super()._apply(fn, *args, **kwargs)

    def log_c(self) -> Tensor:
        """``log c``: ``log(scale)``, plus ``2 log_scale_factor`` when it is learned."""
        log_c = self.loc.new_tensor(math.log(self.scale))
        if self.log_scale_factor is not None:
            log_c = log_c + 2.0 * self.log_scale_factor
        return log_c

    def _check(self, shape: torch.Size, what: str, name: str) -> None:
        if tuple(shape) != self.shape:
            raise PriorMismatchError(
                f"SWAGPrior for {name!r}: the SWAG moments of {self.name!r} have shape "
                f"{self.shape}, the {what} {tuple(shape)}; was the source another architecture?"
            )

    def for_site(self, name: str, weight: Tensor, kernel_dims: int) -> Prior:
        self._check(weight.shape, "parameter", name)
        return self

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        """Exact KL(q || p) summed over the layer (:func:`lowrank_gaussian_kl`)."""
        self._check(posterior.shape, "posterior", posterior.name)
        return _kl(posterior, self.loc, self._precision(posterior.loc.dtype), self.log_c())

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(value)`` for ``value`` of shape ``(*batch, *shape)``; returns ``batch``.

        ``-1/2 [delta^T Sigma^-1 delta + log |Sigma| + d log 2 pi]`` with
        ``Sigma = c Sigma0``, through Woodbury and the determinant lemma.
        """
        d = self.diag.shape[0]
        batch = value.shape[: value.dim() - len(self.shape)]
        self._check(value.shape[len(batch) :], "value", self.name)
        delta = value.reshape(-1, d) - self.loc.reshape(1, d).to(value.dtype)
        precision = self._precision(value.dtype)
        log_c = self.log_c()
        maha = precision.quadratic(delta) * torch.exp(-log_c)
        return (-0.5 * (maha + precision.logdet + d * (log_c + LOG_2PI))).reshape(batch)

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """``mu + sqrt(c) (A^1/2 e1 + U e2)``, ``e1 ~ N(0, I_d)``, ``e2 ~ N(0, I_r)``."""
        self._check(torch.Size(shape), "requested sample", self.name)
        e1 = torch.randn_like(self.diag)
        e2 = torch.randn(self.rank, dtype=self.diag.dtype, device=self.diag.device)
        noise = self.diag.sqrt() * e1 + self.factor @ e2
        return self.loc + torch.exp(0.5 * self.log_c()) * noise.reshape(self.shape)

    def closed_form_log_scale(self, posterior: MeanFieldNormal) -> Tensor:
        """The ELBO-optimal ``log_scale_factor`` for the posterior ``q``.

        The KL's terms in ``t = log_scale_factor`` are
        ``1/2 [Q e^(-2t) + 2 d t]`` with ``Q = E_q[(w - mu)^T Sigma^-1 (w - mu)]``
        (``Sigma`` with ``scale`` but without the learned factor), minimal at
        ``t = 1/2 log(Q / d)``.  Differentiable in the posterior; detach it to assign.
        """
        self._check(posterior.shape, "posterior", posterior.name)
        dtype = posterior.loc.dtype
        delta = (posterior.loc - self.loc.to(dtype)).reshape(1, -1)
        variance = torch.exp(2.0 * posterior.log_scale).reshape(-1)
        expected = self._precision(dtype).quadratic(delta, variance)[0] / self.scale
        return 0.5 * torch.log(expected / delta.shape[1])

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rank": self.rank,
            "scale": self.scale,
            "learn_scale": self.learn_scale,
        }

    def extra_repr(self) -> str:
        return f"{self.name!r}, shape={self.shape}, rank={self.rank}, scale={self.scale:g}"


class SWAGPrior(Prior):
    """Template of the source-trajectory (SWAG) prior: one Gaussian per layer of the source.

    Build it from collected moments (:meth:`from_moments`), or read a moments file or a
    saved prior with :meth:`SWAGPrior.load` / :func:`dwp.priors.load_prior`
    (``scale=`` and ``learn_scale=`` override).  :func:`dwp.bayesianize` binds it to each
    layer (:meth:`for_site`): the layer's name (``"<layer>.weight"``) and shape must be
    those of a layer of the source, else :class:`PriorMismatchError` names the layer.

    The constructor allocates the per-layer buffers for ``layers`` (what a prior file's
    state then fills); they hold the layers' ``mu``, ``a`` and ``U`` end to end:
    ``loc`` and ``diag`` ``(D,)``, ``factor`` ``(D, rank)``, ``D`` the layers' weights.

    Parameters
    ----------
    layers
        Qualified layer name -> weight shape, in order.
    rank
        Columns of ``U`` (SWAG's ``K``; Pre-Train Your Loss uses 5).
    scale
        ``c``, the covariance's factor (the paper's prior scale, tuned on the target).  The
        paper's code multiplies the variance by its scale and, optionally, the low-rank
        factor too (the low-rank covariance by the scale squared); here ``c`` multiplies
        the whole covariance, so it changes the prior's width and keeps its shape.
    learn_scale
        Give each site prior a learned ``log_scale_factor`` (:class:`SWAGSitePrior`).
    """

    kl_kind = KLKind.EXACT

    def __init__(
        self,
        layers: Mapping[str, Sequence[int]],
        rank: int,
        *,
        scale: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("SWAGPrior needs at least one layer")
        self.layers: dict[str, Shape] = {
            str(k): tuple(int(s) for s in v) for k, v in layers.items()
        }
        self._slices: dict[str, slice] = {}
        start = 0
        for name, shape in self.layers.items():
            self._slices[name] = slice(start, start + _numel(shape))
            start += _numel(shape)
        _allocate(self, (start,), rank, scale, learn_scale)

    @classmethod
    def from_moments(
        cls, moments: SWAGStatistics, *, scale: float = 1.0, learn_scale: bool = False
    ) -> SWAGPrior:
        """The prior of SWA moments (:class:`dwp.SWAGMoments`).

        ``A = var / 2`` and ``U = D / sqrt(2 max(K - 1, 1))`` with the ``K`` deviation
        columns held (zero columns up to ``rank`` while fewer were collected); with rank 0,
        ``A = var``.

        Raises
        ------
        ValueError
            Fewer than two snapshots: the moments define no variance yet.
        """
        if moments.n_snapshots < 2:
            raise ValueError(
                f"SWAG moments of {moments.n_snapshots} snapshot(s) define no variance: "
                "collect at least 2 (check the collection's start and interval)"
            )
        prior = cls(moments.layers, moments.rank, scale=scale, learn_scale=learn_scale)
        halve = 0.5 if prior.rank else 1.0
        with torch.no_grad():
            for name, where in prior._slices.items():
                deviations = moments.deviations(name).reshape(-1, where.stop - where.start)
                k = deviations.shape[0]
                prior.loc[where] = moments.mean(name).reshape(-1)
                prior.diag[where] = halve * moments.variance(name).reshape(-1)
                prior.factor[where, :k] = deviations.T / math.sqrt(2.0 * max(k - 1, 1))
        prior.metadata = {
            "n_snapshots": int(moments.n_snapshots),
            "deviation_columns": int(min(moments.n_snapshots, moments.rank)),
        }
        return prior

    def for_site(self, name: str, weight: Tensor, kernel_dims: int) -> Prior:
        """The :class:`SWAGSitePrior` of the layer ``name`` minus ``".weight"``."""
        layer = name.removesuffix(".weight")
        if layer == name:
            raise PriorMismatchError(
                f"SWAGPrior for {name!r}: SWAG moments hold layer weights only; give this "
                "site another prior (e.g. bias_prior=)"
            )
        if layer not in self.layers:
            known = list(self.layers)
            raise PriorMismatchError(
                f"SWAGPrior for {name!r}: the SWAG moments have no layer {layer!r} (they "
                f"hold the weights of {len(known)} layers: {known[:4]}"
                f"{'...' if len(known) > 4 else ''}); was the source another architecture?"
            )
        site = SWAGSitePrior(
            name, self.layers[layer], self.rank, scale=self.scale, learn_scale=self.learn_scale
        )
        site._check(weight.shape, "parameter", name)
        where = self._slices[layer]
        with torch.no_grad():
            site.loc.copy_(self.loc[where].reshape(site.shape))
            site.diag.copy_(self.diag[where])
            site.factor.copy_(self.factor[where])
        site.metadata = {**self.metadata, "layer": layer}
        return site.to(device=weight.device, dtype=weight.dtype)

    def marginal(self, *, pooled: bool = False) -> SWAGPrior:
        """The same Gaussian without its correlations: rank 0, each weight's variance that
        of this prior (``a + sum_k U_k^2``); ``pooled``: one variance, their mean, for every
        weight (an isotropic Gaussian at the SWA mean).  The controls that say whether the
        low-rank covariance carries structure (:func:`dwp.priors.weight_report.weight_scores`)."""
        variance = self.diag + self.factor.pow(2).sum(1)
        if pooled:
            variance = variance.mean().expand_as(variance)
        prior = SWAGPrior(self.layers, 0, scale=self.scale, learn_scale=self.learn_scale)
        with torch.no_grad():
            prior.loc.copy_(self.loc)
            prior.diag.copy_(variance)
        prior.metadata = {**self.metadata, "marginal_of_rank": self.rank, "pooled": pooled}
        return prior

    def config(self) -> dict[str, Any]:
        return {
            "layers": {name: list(shape) for name, shape in self.layers.items()},
            "rank": self.rank,
            "scale": self.scale,
            "learn_scale": self.learn_scale,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_layers": len(self.layers), "weights": self.loc.numel()}

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.layers)}, weights={self.loc.numel()}, rank={self.rank}, "
            f"scale={self.scale:g}, learn_scale={self.learn_scale}"
        )
