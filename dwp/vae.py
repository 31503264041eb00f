"""The kernel VAE: a generative model of convolution kernels, fitted with Pyro.

p(z) = N(0, I),  p(w | z) = N(mu_theta(z), diag sigma_theta(z)^2),  r(z | w) = N(mu_phi(w),
diag sigma_phi(w)^2), over one spatial kernel slice ``w`` (shape ``kernel_shape``: k, k x k
or k x k x k).  Fitted on a bank of kernels from trained source networks, it becomes the
implicit prior of :class:`dwp.priors.DeepWeightPrior`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn

from .devices import resolve_device
from .normal import normal_log_density, standard_normal_kl

__all__ = [
    "KernelVAE",
    "VAEFit",
    "default_latent_dim",
    "fit_kernel_vae",
    "gaussian_baselines",
    "split_kernels",
]

Architecture = Literal["mlp", "conv"]
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def default_latent_dim(kernel_shape: tuple[int, ...]) -> int:
    """The papers' latent sizes: 6 for 3D kernels (Kuzina et al.), 4 for 2D kernels of 5x5
    and larger, 2 for 3x3 and smaller (Atanov et al.)."""
    if len(kernel_shape) >= 3:
        return 6
    return 4 if math.prod(kernel_shape) >= 25 else 2


class _GaussianMLP(nn.Module):
    """Two ELU hidden layers, output split into a location and a floored softplus scale.

    The state-dict layout (``net.0``, ``net.2``, ``net.4``) is part of the saved-prior format.
    """

    def __init__(self, n_in: int, hidden: int, n_out: int, min_scale: float) -> None:
        super().__init__()
        self.min_scale = min_scale
        # in-place ELU: after a Linear its input is not needed for the backward pass, and
        # the in-place version computes its gradient from the output instead of another exp
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.ELU(inplace=True),
            nn.Linear(hidden, hidden), nn.ELU(inplace=True),
            nn.Linear(hidden, 2 * n_out),
        )  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden, head = self.net[:-1](x), self.net[-1]
        n = head.out_features // 2
        # the head's two halves as two matmuls: both outputs come out contiguous, where
        # chunking one output leaves strided halves (softplus on one is ~14x slower, and
        # making it contiguous is a copy of the whole kernel-sized tensor)
        loc = F.linear(hidden, head.weight[:n], head.bias[:n])
        raw = F.linear(hidden, head.weight[n:], head.bias[n:])
        # in place: softplus's backward needs its input, not its output
        return loc, F.softplus(raw).add_(self.min_scale)


class _MLPEncoder(_GaussianMLP):
    def __init__(self, n_in: int, hidden: int, latent: int) -> None:
        super().__init__(n_in, hidden, latent, min_scale=1e-4)

    def forward(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(w.flatten(1))


class _MLPDecoder(_GaussianMLP):
    def __init__(self, latent: int, hidden: int, kernel_shape: tuple[int, ...], min_scale: float):
        # the scale's floor: a decoder scale that shrinks to 0 makes log p(w | z) unbounded
        super().__init__(latent, hidden, math.prod(kernel_shape), min_scale)
        self.kernel_shape = kernel_shape

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        loc, scale = super().forward(z)
        shape = (-1, *self.kernel_shape)
        return loc.reshape(shape), scale.reshape(shape)


class _ConvEncoder(nn.Module):
    """Kuzina et al. (2019), appendix B, for any kernel shape.

    The listing's two MaxPool3d(2) layers cannot run on a 3x3x3 input (the map is one voxel
    after the first conv); they are left out, the second conv covers the whole kernel
    instead.  Channel widths (32, 64, 128), ELU and the linear latent heads are kept.
    """

    def __init__(self, kernel_shape: tuple[int, ...], latent: int) -> None:
        super().__init__()
        conv = _CONV[len(kernel_shape)]
        self.net = nn.Sequential(
            conv(1, 32, 3, padding=1), nn.ELU(),
            conv(32, 64, kernel_shape), nn.ELU(),
            conv(64, 128, 1), nn.ELU(), nn.Flatten(),
        )  # fmt: skip
        self.loc = nn.Linear(128, latent)
        self.log_scale = nn.Linear(128, latent)

    def forward(self, w: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(w.unsqueeze(1))
        return self.loc(h), self.log_scale(h).exp()


class _ConvDecoder(nn.Module):
    """Kuzina et al. (2019), appendix B: transposed convs back to the kernel, tanh heads.

    As published, both heads are bounded by tanh: means in [-1, 1] and log-scales in
    [-1, 1], i.e. decoder standard deviations in [0.37, 2.72] -- very broad for kernel
    weights of typical magnitude 0.1, which makes this prior weak.  Kept for faithful
    reproduction; the MLP default has learned, floored scales.
    """

    def __init__(self, kernel_shape: tuple[int, ...], latent: int) -> None:
        super().__init__()
        d = len(kernel_shape)
        conv, conv_t = _CONV[d], _CONV_T[d]
        self.d = d
        self.linear = nn.Linear(latent, 128)
        self.net = nn.Sequential(
            conv(128, 128, 3, padding=1), nn.ELU(),
            conv_t(128, 128, kernel_shape), nn.ELU(),
            conv_t(128, 64, 1), nn.ELU(),
            conv_t(64, 32, 1), nn.ELU(),
        )  # fmt: skip
        self.loc = conv_t(32, 1, 1)
        self.log_scale = conv_t(32, 1, 1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(self.linear(z).reshape(-1, 128, *(1,) * self.d))
        return torch.tanh(self.loc(h)).squeeze(1), torch.tanh(self.log_scale(h)).exp().squeeze(1)


class KernelVAE(nn.Module):
    """A VAE over convolution kernel slices of one shape.

    Parameters
    ----------
    kernel_shape
        Shape of one kernel slice, e.g. ``(3, 3, 3)``.
    latent_dim
        Size of z; default :func:`default_latent_dim` (6 for 3D kernels).
    architecture
        ``"mlp"`` (default): fully connected encoder and decoder with two hidden layers of
        ``hidden`` units and ELU, softplus scales (the original DWP code's design; cheap
        enough to evaluate on every training step).  ``"conv"``: the MRI paper's
        convolutional VAE (Kuzina et al. 2019, appendix B), for faithful reproduction;
        about 100x slower per kernel.
    hidden
        Hidden width of the MLP architecture.  The original code used 64; 32 is the default
        here because on 3x3x3 kernels of trained 3D nets it reached the same held-out ELBO
        (47.4 / 48.8 vs 47.9 / 48.7 nats per kernel, two seeds) at about half the bound's
        cost, which keeps the KL bound under 10 % of a U-Net training step.  On kernels with
        nonlinear structure (``benchmarks.vae_capacity``: synthetic soft edges) 64 is 3.6
        nats per kernel better than 32, and 16 falls below a full-covariance Gaussian.
    min_scale
        Floor of the MLP decoder's standard deviation.

    Shapes
    ------
    ``encode``: ``(N, *kernel_shape) -> (N, L), (N, L)``;
    ``decode``: ``(N, L) -> (N, *kernel_shape), (N, *kernel_shape)``.
    """

    def __init__(
        self,
        kernel_shape: tuple[int, ...] | list[int],
        latent_dim: int | None = None,
        architecture: Architecture = "mlp",
        hidden: int = 32,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        kernel_shape = tuple(int(k) for k in kernel_shape)
        if not 1 <= len(kernel_shape) <= 3 or min(kernel_shape) < 1:
            raise ValueError(f"kernel_shape must have 1 to 3 positive sizes, got {kernel_shape}")
        if architecture not in ("mlp", "conv"):
            raise ValueError(f"architecture must be 'mlp' or 'conv', got {architecture!r}")
        self.kernel_shape = kernel_shape
        self.latent_dim = int(latent_dim or default_latent_dim(kernel_shape))
        self.architecture, self.hidden, self.min_scale = architecture, int(hidden), float(min_scale)
        if architecture == "mlp":
            self.encoder = _MLPEncoder(math.prod(kernel_shape), self.hidden, self.latent_dim)
            self.decoder = _MLPDecoder(self.latent_dim, self.hidden, kernel_shape, self.min_scale)
        else:
            self.encoder = _ConvEncoder(kernel_shape, self.latent_dim)
            self.decoder = _ConvDecoder(kernel_shape, self.latent_dim)

    def config(self) -> dict:
        """Constructor arguments (what a saved prior needs to rebuild this VAE)."""
        return {
            "kernel_shape": list(self.kernel_shape),
            "latent_dim": self.latent_dim,
            "architecture": self.architecture,
            "hidden": self.hidden,
            "min_scale": self.min_scale,
        }

    def _check(self, w: Tensor) -> None:
        if tuple(w.shape[1:]) != self.kernel_shape:
            raise ValueError(
                f"KernelVAE for kernels {self.kernel_shape} got a batch of shape {tuple(w.shape)}"
            )

    def encode(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """r(z | w): location and scale, each ``(N, L)``."""
        self._check(w)
        return self.encoder(w)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """p(w | z): location and scale, each ``(N, *kernel_shape)``."""
        return self.decoder(z)

    def elbo(self, w: Tensor, n_samples: int = 1) -> Tensor:
        """Per-kernel evidence lower bound on log p(w) (nats), shape ``(N,)``.

        E_r[log p(w | z)] by ``n_samples`` reparameterised draws, KL(r || p(z)) in closed form.
        """
        z_loc, z_scale = self.encode(w)
        kl = standard_normal_kl(z_loc, z_scale)
        log_lik = 0.0
        for _ in range(n_samples):
            z = z_loc + z_scale * torch.randn_like(z_loc)
            log_lik = log_lik + normal_log_density(w, *self.decode(z)).flatten(1).sum(-1)
        return log_lik / n_samples - kl

    def iwae(self, w: Tensor, n_samples: int = 64) -> Tensor:
        """Importance-weighted lower bound on log p(w) per kernel (Burda et al. 2016), ``(N,)``.

            log (1/K) sum_k p(w | z_k) p(z_k) / r(z_k | w),  z_k ~ r(z | w),  K = n_samples.

        Its expectation lies below log p(w) and above the ELBO, and rises toward log p(w) as
        K grows; it equals log p(w) for every draw when r is the exact posterior.  Memory
        grows as K x N x the kernel size: score large banks in chunks.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        z_loc, z_scale = self.encode(w)
        z = z_loc + z_scale * torch.randn(n_samples, *z_loc.shape, dtype=w.dtype, device=w.device)
        log_weight = (normal_log_density(z, 0.0, 1.0) - normal_log_density(z, z_loc, z_scale)).sum(
            -1
        )
        w_loc, w_scale = self.decode(z.flatten(0, 1))
        observed = w.expand(n_samples, *w.shape).flatten(0, 1)
        log_lik = normal_log_density(observed, w_loc, w_scale).flatten(1).sum(-1)
        return torch.logsumexp(log_weight + log_lik.view(n_samples, -1), 0) - math.log(n_samples)

    def sample(self, n: int, use_mean: bool = False) -> Tensor:
        """``n`` kernels from the prior: z ~ N(0, I), w ~ p(w | z) (or its mean)."""
        ref = next(self.decoder.parameters(), None)
        ref = ref if ref is not None else next(self.decoder.buffers())
        z = torch.randn(n, self.latent_dim, device=ref.device, dtype=ref.dtype)
        loc, scale = self.decode(z)
        return loc if use_mean else loc + scale * torch.randn_like(loc)

    # -- Pyro model and guide over a minibatch of the bank --------------------------------
    def model(self, w: Tensor, index: Tensor, size: int) -> None:
        """Pyro model: z ~ N(0, I), w ~ p(w | z), for kernels ``w`` = bank[index] of ``size``."""
        pyro.module("decoder", self.decoder)
        with pyro.plate("kernels", size, subsample=index):
            z = pyro.sample("z", dist.Normal(w.new_zeros(len(w), self.latent_dim), 1.0).to_event(1))
            loc, scale = self.decode(z)
            pyro.sample("w", dist.Normal(loc, scale).to_event(len(self.kernel_shape)), obs=w)

    def guide(self, w: Tensor, index: Tensor, size: int) -> None:
        """Pyro guide: z ~ r(z | w)."""
        pyro.module("encoder", self.encoder)
        with pyro.plate("kernels", size, subsample=index):
            loc, scale = self.encode(w)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def extra_repr(self) -> str:
        return (
            f"kernel_shape={self.kernel_shape}, latent_dim={self.latent_dim}, "
            f"architecture={self.architecture!r}"
        )


# -- fitting -------------------------------------------------------------------------------
@dataclass
class VAEFit:
    """A fitted kernel VAE and how the fit went.

    Attributes
    ----------
    vae
        The VAE at its best held-out epoch, on the device it was fitted on.
    history
        One dict per epoch: ``epoch``, ``train_elbo`` and ``val_elbo`` (nats per kernel),
        ``lr``.
    best_val_elbo
        Held-out ELBO per kernel at the best epoch.
    baselines
        Held-out log-likelihood per kernel of Gaussians fitted to the same training kernels
        (``"diagonal"``, ``"full"``): if the VAE does not beat the full-covariance Gaussian,
        the prior carries little structure beyond a correlated shrinkage.
    n_train, n_val
        Kernels used for fitting and for the held-out score.
    """

    vae: KernelVAE
    history: list[dict] = field(default_factory=list)
    best_val_elbo: float = float("-inf")
    baselines: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_val: int = 0
    stopped: str = ""

    def summary(self) -> dict:
        """JSON-ready summary (what a saved prior keeps of the fit)."""
        return {
            "best_val_elbo": self.best_val_elbo,
            "baselines": self.baselines,
            "epochs": len(self.history),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "stopped": self.stopped,
            "history": self.history,
        }


def split_kernels(
    kernels: Tensor, fractions: Mapping[str, float], generator: torch.Generator
) -> dict[str, Tensor]:
    """Disjoint random parts of ``kernels``: one per fraction, in order, and ``"train"``.

    Part ``name`` holds ``round(f * N)`` kernels (at least one when ``f > 0``, none when
    ``f == 0``); ``"train"`` the rest, which must not be empty.  One ``randperm`` of the
    generator decides all parts.
    """
    n = len(kernels)
    perm = torch.randperm(n, generator=generator)
    parts, start = {}, 0
    for name, fraction in fractions.items():
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
        size = max(1, round(fraction * n)) if fraction > 0 else 0
        parts[name], start = kernels[perm[start : start + size]], start + size
    if start >= n:
        held_out = ", ".join(f"{name}={f}" for name, f in fractions.items())
        raise ValueError(f"{held_out} holds out all {n} kernels: none left to train on")
    parts["train"] = kernels[perm[start:]]
    return parts


def gaussian_baselines(train: Tensor, val: Tensor) -> dict[str, float]:
    """Held-out mean log-likelihood per kernel of diagonal and full-covariance Gaussians."""
    x, y = train.flatten(1).double(), val.flatten(1).double()
    mean = x.mean(0)
    cov = torch.cov(x.T, correction=int(len(x) > 1)) + 1e-6 * torch.eye(
        x.shape[1], dtype=x.dtype
    )  # ridge: rank-deficient banks
    full = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    diag = torch.distributions.Normal(mean, cov.diagonal().sqrt())
    return {
        "diagonal": float(diag.log_prob(y).sum(-1).mean()),
        "full": float(full.log_prob(y).mean()),
    }


@torch.no_grad()
def _mean_elbo(vae: KernelVAE, kernels: Tensor, batch_size: int) -> float:
    total = sum(float(vae.elbo(chunk).sum()) for chunk in kernels.split(batch_size))
    return total / len(kernels)


def fit_kernel_vae(
    kernels: Tensor,
    *,
    latent_dim: int | None = None,
    architecture: Architecture = "mlp",
    hidden: int = 32,
    epochs: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    lr_patience: int = 15,
    lr_factor: float = 0.1,
    min_lr: float = 1e-6,
    early_stopping: int = 30,
    seed: int = 0,
    progress: bool = True,
    desc: str = "kernel VAE",
    val_kernels: Tensor | None = None,
    device: str | torch.device = "cpu",
) -> VAEFit:
    """Fit a :class:`KernelVAE` to a bank of kernels by stochastic variational inference.

    Pyro's ``SVI`` with ``Trace_ELBO`` on the :meth:`KernelVAE.model` /
    :meth:`KernelVAE.guide` pair, minibatches subsampled in a plate (so the loss is scaled
    to the whole training set), Adam under ``ReduceLROnPlateau`` on the held-out ELBO
    (the MRI paper's patience 15), early stopping after ``early_stopping`` epochs without
    improvement or when the learning rate reaches ``min_lr``; the best epoch's weights are
    returned.  Pyro's global parameter store is left as it was.

    Parameters
    ----------
    kernels
        The bank of one group, ``(N, *kernel_shape)``.
    latent_dim, architecture, hidden
        See :class:`KernelVAE`.
    epochs, batch_size, lr
        Optimisation budget (the original DWP code: batch 128, up to 300-500 epochs).
    val_fraction
        Fraction of kernels held out for the per-epoch ELBO (at least one kernel).
    val_kernels
        The held-out kernels themselves, ``(M, *kernel_shape)``: then every kernel of
        ``kernels`` is trained on and ``val_fraction`` is not used (how
        :meth:`dwp.DeepWeightPrior.fit` keeps a third split, for testing only).
    seed
        Seeds the split, the initialisation and the SVI noise: same seed, same VAE.
    progress
        Show a tqdm progress bar with the held-out ELBO.
    device
        Where to fit (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), checked before any
        work (:func:`dwp.devices.resolve_device`).  The VAE is initialised on the CPU and
        then moved, so a seed starts every device from the same weights; the kernels are
        moved once, the Gaussian baselines are computed on the CPU.  The returned
        :attr:`VAEFit.vae` stays on ``device``.

    Raises
    ------
    ValueError
        Too few or non-finite kernels, a bad fraction, or a ``device`` this machine lacks.
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)

    minimum = 2 if val_kernels is None else 1
    if kernels.dim() < 2 or len(kernels) < minimum:
        raise ValueError(
            f"need at least {minimum} kernels of shape (N, *kernel_shape), got "
            f"{tuple(kernels.shape)}"
        )
    if not torch.isfinite(kernels).all():
        raise ValueError("the kernel bank has non-finite values")
    generator = torch.Generator().manual_seed(seed)
    kernels = kernels.detach().float().cpu()
    if val_kernels is None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        parts = split_kernels(kernels, {"val_fraction": val_fraction}, generator)
        val, train = parts["val_fraction"], parts["train"]
    else:
        val, train = val_kernels.detach().float().cpu(), kernels
        if len(val) < 1 or val.shape[1:] != train.shape[1:] or not torch.isfinite(val).all():
            raise ValueError(
                f"val_kernels must be finite kernels of shape (M >= 1, "
                f"{', '.join(map(str, train.shape[1:]))}), got {tuple(val.shape)}"
            )
    n_val = len(val)
    # the bank is small (kernels, not images): one copy on the device, no transfer per step;
    # on the CPU ``to`` returns the tensors themselves
    train_on, val_on = train.to(device), val.to(device)

    with torch.random.fork_rng(), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        vae = KernelVAE(tuple(kernels.shape[1:]), latent_dim, architecture, hidden).to(device)
        scheduler = pyro.optim.ReduceLROnPlateau(
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": lr},
                "factor": lr_factor,
                "patience": lr_patience,
                "min_lr": min_lr,
            }
        )
        svi = SVI(vae.model, vae.guide, scheduler, loss=Trace_ELBO())
        fit = VAEFit(vae, n_train=len(train), n_val=n_val)
        best_state, since_best = copy.deepcopy(vae.state_dict()), 0
        bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
        for epoch in bar:
            # drawn on the CPU generator (the same order on every device), then moved
            order = torch.randperm(len(train), generator=generator).to(device)
            loss = sum(svi.step(train_on[idx], idx, len(train)) for idx in order.split(batch_size))
            train_elbo = -loss / len(order.split(batch_size)) / len(train)
            val_elbo = _mean_elbo(vae, val_on, 4096)
            scheduler.step(-val_elbo)
            current_lr = _current_lr(scheduler, lr)
            fit.history.append(
                {"epoch": epoch, "train_elbo": train_elbo, "val_elbo": val_elbo, "lr": current_lr}
            )
            bar.set_postfix(val_elbo=f"{val_elbo:.3f}", lr=f"{current_lr:.1e}")
            if val_elbo > fit.best_val_elbo:
                fit.best_val_elbo, since_best = val_elbo, 0
                best_state = copy.deepcopy(vae.state_dict())
            else:
                since_best += 1
            if since_best >= early_stopping:
                fit.stopped = f"no held-out improvement for {early_stopping} epochs"
                break
            if current_lr <= min_lr * (1 + 1e-9):
                fit.stopped = "learning rate reached its floor"
                break
        else:
            fit.stopped = f"epoch budget ({epochs}) spent"
        vae.load_state_dict(best_state)
    fit.baselines = gaussian_baselines(train, val)
    return fit


def _current_lr(scheduler: pyro.optim.PyroLRScheduler, default: float) -> float:
    for sched in scheduler.optim_objs.values():
        return float(sched.optimizer.param_groups[0]["lr"])
    return default
