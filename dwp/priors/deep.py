"""The deep weight prior (Atanov et al. 2019): a kernel VAE as an implicit prior.

For one kernel slice w with mean-field posterior q(w), the prior p(w) = ∫ p(w | z) p(z) dz
has no closed-form KL; with the VAE's encoder r(z | w) as an auxiliary distribution,

    KL(q(w) || p(w)) <= -H(q) + E_q(w)[ KL(r(z | w) || p(z)) - E_r(z | w) log p(w | z) ],

with equality when r is the exact posterior p(z | w).  :meth:`DeepWeightSitePrior.kl`
returns this bound summed over every kernel slice of a layer, estimated with
reparameterised samples of w and z (H(q) and KL(r || p) in closed form).

Who trains what: gradients reach the posterior (through encoder and decoder) and, by
default, the encoder, which keeps tightening the bound on the target objective (Kuzina et
al. 2019); ``train_encoder=False`` freezes it (the original code).  The decoder and p(z)
are always frozen: their weights become buffers, so they are in the ``state_dict`` but not
in ``parameters()`` and can never reach an optimiser.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..devices import resolve_device
from ..io import FileFormat
from ..kernel_bank import KernelBank
from ..normal import normal_entropy, normal_nll_sum, standard_normal_kl
from ..posterior import MeanFieldNormal, reparam_sample
from ..vae import KernelVAE, VAEFit, fit_kernel_vae
from .base import KLKind, Prior
from .files import PriorFileError, register_format
from .groups import (
    GroupModules,
    GroupParameters,
    KernelGroups,
    LayerGroups,
    check_kernel_shape,
    layer_groups_config,
)
from .kernel_gaussian import KernelGaussianPrior
from .report import IWAE_SAMPLES, held_out_scores, render_scores, split_bank

__all__ = ["DeepWeightPrior", "DeepWeightSitePrior", "PriorFileError"]

#: layers with fewer kernels than this share one VAE call per step (see ``kl_batch``): a
#: call costs ~1 ms of overhead, concatenating a layer ~0.1 us per kernel (CPU, measured)
_BATCH_BELOW = 8192


def _joins_every_layer(device: torch.device) -> bool:
    """On an accelerator a call costs its ~100 launches, a copy microseconds: all join."""
    return device.type != "cpu"


#: The deep weight prior's file: its VAEs (config and weights per group), the layer ->
#: group map, the estimator options and the fit's provenance.
PRIOR_FILE = FileFormat(
    tag="dwp.DeepWeightPrior",
    version=1,
    keys=("groups", "layer_groups", "options", "metadata"),
    error=PriorFileError,
    what="deep weight prior",
)


def _freeze_as_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a buffer of the same name (in place)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach().clone())


def _cpu_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every tensor on the CPU: the same ordered dict (its
    ``_metadata`` kept), entries replaced in place; a CPU tensor's ``cpu()`` is itself, so a
    CPU prior's file is byte for byte what it was."""
    state = module.state_dict()
    for key, value in state.items():
        state[key] = value.cpu()
    return state


class DeepWeightSitePrior(Prior):
    """The deep weight prior of one layer: its group's VAE and the estimator options.

    Created by :meth:`DeepWeightPrior.for_site` (through :func:`dwp.bayesianize`); the VAE
    module is shared by every layer of the group, and so is the group's learned scale
    factor ``log_scale_factor`` when the prior learns one (``learn_scale=True``): the
    prior over a kernel is then ``p(w) = p_VAE(w / c) / c^k``, ``c = exp(log_scale_factor)``.
    """

    kl_kind = KLKind.UPPER_BOUND

    def __init__(
        self,
        vae: KernelVAE,
        group: str,
        n_samples: int = 1,
        chunk_size: int | None = None,
        kernel_fraction: float = 1.0,
        share_forward_sample: bool = True,
        log_scale_factor: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.vae, self.group = vae, group
        self.n_samples, self.chunk_size = n_samples, chunk_size
        self.kernel_fraction = kernel_fraction
        self.shares_weight_sample = bool(share_forward_sample)
        # the group's parameter itself, shared by its layers (registered in every site prior;
        # a model's parameters() lists it once)
        self.log_scale_factor = log_scale_factor

    def _kernels(self, x: Tensor) -> Tensor:
        return x.reshape(-1, *self.vae.kernel_shape)

    def _bound_terms(self, loc: Tensor, log_scale: Tensor, sample: Tensor | None) -> Tensor:
        """sum over kernels of the MC mean of KL(r(z | w) || p(z)) - log p(w | z); the first
        w is ``sample`` when given (the forward pass's), the others are drawn here."""
        total = loc.new_zeros(())
        for i in range(self.n_samples):
            # sums taken as early as possible: on large layers the cost is memory traffic
            # through kernel-sized temporaries, not the VAE's matmuls
            w = sample if i == 0 and sample is not None else reparam_sample(loc, log_scale)
            z_loc, z_scale = self.vae.encode(w)
            z = torch.addcmul(z_loc, z_scale, torch.randn_like(z_loc))
            w_loc, w_scale = self.vae.decode(z)
            total = (
                total + standard_normal_kl(z_loc, z_scale).sum() + normal_nll_sum(w, w_loc, w_scale)
            )
        return total / self.n_samples

    def kl(self, posterior: MeanFieldNormal) -> Tensor:
        """Upper bound on KL(q || p) summed over the layer's kernel slices (a scalar).

        The first of the ``n_samples`` weight samples is ``posterior.sample`` when there is
        one (the weight of the layer's forward pass: the step then draws its weights once),
        else a fresh draw.  With ``chunk_size`` the kernels are processed in chunks, each
        under activation checkpointing, so the VAE's activations for all kernels are never
        held at once (the same random draws are replayed in the backward pass).
        """
        return self.kl_batch([posterior])

    def batch_key(self) -> tuple:
        # layers of one group share the VAE module: one encoder/decoder pass for all of them
        return (id(self.vae), self.n_samples, self.chunk_size, self.kernel_fraction)

    def kl_batch(self, posteriors: Sequence[MeanFieldNormal]) -> Tensor:
        """The bound summed over several layers of this group, in one pass of the VAE."""
        for posterior in posteriors:
            check_kernel_shape(
                posterior.name, posterior.shape, posterior.kernel_dims, self.vae.kernel_shape,
                DeepWeightPrior.what,
            )  # fmt: skip
        # Batching saves the per-call overhead of small layers; on a CPU large layers go
        # alone, as concatenating them would only copy their kernels (and gradients) once more.
        per_kernel = math.prod(self.vae.kernel_shape)
        join_all = _joins_every_layer(posteriors[0].loc.device)
        small, large = [], []
        for p in posteriors:
            (small if join_all or p.loc.numel() < _BATCH_BELOW * per_kernel else large).append(p)
        terms = []
        for call in [[p] for p in large] + ([small] if small else []):
            loc, log_scale, sample = self._joined(call)
            terms.append(self._vae_terms(*self._scaled(loc, log_scale, sample)))
            terms.append(-normal_entropy(log_scale))
        bound = torch.stack(terms).sum()
        if self.log_scale_factor is not None:
            # p(w) = p_VAE(w / c) / c^k per kernel: the change of variables adds log c per
            # weight to -log p (the entropy is q's own, unscaled)
            bound = bound + self.log_scale_factor * sum(p.loc.numel() for p in posteriors)
        return bound

    def _scaled(
        self, loc: Tensor, log_scale: Tensor, sample: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The kernels divided by the learned scale factor (as they are without one)."""
        if self.log_scale_factor is None:
            return loc, log_scale, sample
        inverse = torch.exp(-self.log_scale_factor)
        sample = None if sample is None else sample * inverse
        return loc * inverse, log_scale - self.log_scale_factor, sample

    def _joined(
        self, posteriors: Sequence[MeanFieldNormal]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Kernel views ``(M, *k)`` of the posteriors' locations, log-scales and forward
        samples (``None`` unless every posterior has one), concatenated only when there
        are several (``torch.cat`` of one tensor would still copy it)."""
        samples = [p.sample for p in posteriors]
        if any(s is None for s in samples):
            samples = None
        if len(posteriors) == 1:
            (p,) = posteriors
            sample = None if samples is None else self._kernels(samples[0])
            return self._kernels(p.loc), self._kernels(p.log_scale), sample
        return (
            torch.cat([self._kernels(p.loc) for p in posteriors]),
            torch.cat([self._kernels(p.log_scale) for p in posteriors]),
            None if samples is None else torch.cat([self._kernels(s) for s in samples]),
        )

    def _vae_terms(self, loc: Tensor, log_scale: Tensor, sample: Tensor | None) -> Tensor:
        """The bound without the entropy, for kernels ``(M, *k)``: subsampled, chunked."""
        scale = 1.0
        if self.kernel_fraction < 1.0:
            # unbiased: a uniform random subset of m kernels, its sum scaled by M / m
            m = max(1, math.ceil(self.kernel_fraction * len(loc)))
            keep = torch.randperm(len(loc), device=loc.device)[:m]
            scale = len(loc) / m
            loc, log_scale = loc[keep], log_scale[keep]
            sample = None if sample is None else sample[keep]
        if self.chunk_size is None or len(loc) <= self.chunk_size:
            return scale * self._bound_terms(loc, log_scale, sample)
        chunks = math.ceil(len(loc) / self.chunk_size)
        samples = [None] * chunks if sample is None else sample.split(self.chunk_size)
        parts = [
            checkpoint(self._bound_terms, l_chunk, s_chunk, w_chunk, use_reentrant=False)
            for l_chunk, s_chunk, w_chunk in zip(
                loc.split(self.chunk_size), log_scale.split(self.chunk_size), samples, strict=True
            )
        ]
        return scale * torch.stack(parts).sum()

    def _factor(self) -> Tensor | float:
        return 0.0 if self.log_scale_factor is None else self.log_scale_factor

    def log_prob(self, value: Tensor) -> Tensor:
        """A lower bound on log p(value): the VAE's ELBO summed over the kernel slices."""
        kernels = self._kernels(value) * torch.exp(-torch.as_tensor(self._factor()))
        return self.vae.elbo(kernels).sum() - self._factor() * value.numel()

    def kernel_log_prob(self, kernels: Tensor, iwae_samples: int = IWAE_SAMPLES) -> Tensor:
        """A lower bound on log p(w) of each kernel slice, ``(N, *kernel_shape) -> (N,)``:
        the VAE's importance-weighted bound with ``iwae_samples`` samples
        (:meth:`~dwp.KernelVAE.iwae`), what the fit report scores."""
        factor = self._factor()
        k = math.prod(self.vae.kernel_shape)
        scaled = kernels * torch.exp(-torch.as_tensor(factor))
        return self.vae.iwae(scaled, iwae_samples) - factor * k

    def sample(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """A weight tensor of ``shape`` whose kernel slices are drawn from the VAE."""
        n = math.prod(shape) // math.prod(self.vae.kernel_shape)
        return (self.vae.sample(n) * torch.exp(torch.as_tensor(self._factor()))).reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"group={self.group!r}, n_samples={self.n_samples}, chunk_size={self.chunk_size}, "
            f"kernel_fraction={self.kernel_fraction:g}, "
            f"share_forward_sample={self.shares_weight_sample}"
        )

    # Validated on load (Prior._load_from_state_dict): a checkpoint's site must belong to
    # the same group and have a VAE of the same configuration.
    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "group": self.group, "vae": self.vae.config()}


class DeepWeightPrior(KernelGroups, Prior):
    """Kernel VAEs as an implicit prior over the conv kernels of a network.

    One VAE per group of layers; ``layer_groups`` maps the target network's layer names to
    groups (the kernel bank's provenance gives it when source and target share an
    architecture).  Pass the prior to :func:`dwp.bayesianize`; each chosen layer gets a
    :class:`DeepWeightSitePrior` whose ``kl`` is the auxiliary upper bound.

    Parameters
    ----------
    vaes
        Fitted VAEs by group name (copied: the originals are left trainable).
    layer_groups
        Layer name -> group: a mapping (keys may be glob patterns) or a function returning a
        group name or ``None``.  Default: every layer maps to the only group, if there is one.
    n_samples
        Monte Carlo samples of (w, z) per kernel and step (the original's ``--dwp_samples``).
    chunk_size
        Process at most this many kernels at once (activation checkpointing per chunk).
    kernel_fraction
        Evaluate the VAE terms on a uniform random fraction of each group's kernels per
        step, scaled up: still an unbiased estimate of the bound (the entropy stays exact),
        with more variance, at a fraction of the cost -- for very wide networks.
    train_encoder
        Keep the encoder trainable (default) or freeze it like the decoder.
    share_forward_sample
        Use the weight sample of the layer's last (``reparam``) forward pass as the first
        Monte Carlo sample of the bound, while the parameters are unchanged (default): the
        same unbiased estimate, with the weights drawn once per step instead of twice
        (about a sixth of the bound's cost on large layers).  ``False`` always draws
        independently of the forward pass.
    learn_scale
        Empirical Bayes on the prior's strength: each group learns a scale factor ``c``
        (``log_scale_factor``, 0 at the start), the prior over its kernels becoming
        ``p_VAE(w / c) / c^k``; the ELBO's gradient trains it with the posterior (an implicit
        prior has no closed-form optimum).  Shared by the group's layers, as its VAE is.
    metadata
        Provenance to save with the prior (sources, layers, kernel counts, fit summaries).
    """

    kl_kind = KLKind.UPPER_BOUND
    what = "deep weight prior"

    def __init__(
        self,
        vaes: Mapping[str, KernelVAE],
        layer_groups: LayerGroups = None,
        *,
        n_samples: int = 1,
        chunk_size: int | None = None,
        kernel_fraction: float = 1.0,
        train_encoder: bool = True,
        share_forward_sample: bool = True,
        learn_scale: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not vaes:
            raise ValueError("DeepWeightPrior needs at least one VAE")
        if n_samples < 1 or (chunk_size is not None and chunk_size < 1):
            raise ValueError(
                f"n_samples and chunk_size must be >= 1, got {n_samples}, {chunk_size}"
            )
        if not 0.0 < kernel_fraction <= 1.0:
            raise ValueError(f"kernel_fraction must be in (0, 1], got {kernel_fraction}")
        self.vaes = GroupModules({g: copy.deepcopy(v) for g, v in vaes.items()})
        for vae in self.vaes.values():
            _freeze_as_buffers(vae.decoder)
            if not train_encoder:
                _freeze_as_buffers(vae.encoder)
        self.layer_groups = layer_groups
        self.n_samples, self.chunk_size, self.train_encoder = n_samples, chunk_size, train_encoder
        self.kernel_fraction = float(kernel_fraction)
        self.share_forward_sample = bool(share_forward_sample)
        self.learn_scale = bool(learn_scale)
        self.log_scale_factors = (
            GroupParameters({g: nn.Parameter(torch.zeros(())) for g in self.vaes})
            if self.learn_scale
            else None
        )
        self.metadata = dict(metadata or {})

    @property
    def groups(self) -> list[str]:
        return list(self.vaes)

    def kernel_shape_of(self, group: str) -> tuple[int, ...]:
        return self.vaes[group].kernel_shape

    def for_group(self, group: str) -> DeepWeightSitePrior:
        return DeepWeightSitePrior(
            self.vaes[group],
            group,
            self.n_samples,
            self.chunk_size,
            self.kernel_fraction,
            self.share_forward_sample,
            None if self.log_scale_factors is None else self.log_scale_factors[group],
        )

    # -- fitting ------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        bank: KernelBank,
        *,
        latent_dim: int | None = None,
        architecture: str = "mlp",
        hidden: int = 32,
        seed: int = 0,
        progress: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        iwae_samples: int = IWAE_SAMPLES,
        n_samples: int = 1,
        chunk_size: int | None = None,
        kernel_fraction: float = 1.0,
        train_encoder: bool = True,
        share_forward_sample: bool = True,
        device: str | torch.device = "cpu",
        **fit_options: Any,
    ) -> DeepWeightPrior:
        """Fit one :class:`~dwp.vae.KernelVAE` per group of a kernel bank.

        Each group's kernels are split three ways (:func:`~dwp.priors.report.split_bank`):
        training kernels; validation kernels, for the choices of the fit (early stopping,
        the learning-rate schedule, the best epoch); test kernels, for the fit report only.

        Parameters
        ----------
        bank
            A :class:`dwp.kernels.KernelBank`; its ``layer_groups`` become the prior's
            mapping from layers to groups.
        latent_dim, architecture, hidden
            VAE settings (see :class:`~dwp.vae.KernelVAE`).
        seed
            Group ``i`` is split and fitted with seed ``seed + i``.
        val_fraction, test_fraction
            Shares of each group's kernels for validation and for the test (0: no test
            split and no held-out scores).
        iwae_samples
            K of the VAE's importance-weighted bound in the test scores.
        n_samples, chunk_size, kernel_fraction, train_encoder, share_forward_sample
            Options of the resulting prior.
        device
            Where the VAEs are fitted and scored (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
            ``"mps"``), checked before any work (:func:`dwp.devices.resolve_device`).
            The returned prior is on this device, like a module trained there: pass it to
            :func:`dwp.bayesianize` for a network on the same device (or ``.to()`` it).
            :meth:`save` writes CPU tensors, so the file loads anywhere; :meth:`load`
            gives a CPU prior.
        fit_options
            Passed to :func:`~dwp.vae.fit_kernel_vae` (``epochs``, ``batch_size``, ``lr``...).

        Returns
        -------
        DeepWeightPrior
            ``metadata["fits"]`` holds per group the fit's validation scores (as before:
            ``best_val_elbo``, the Gaussian ``baselines`` on the validation kernels,
            ``n_train``, ``n_val``, the history) and ``n_test``; ``metadata["held_out"]``
            the test scores of the VAE, a kernel Gaussian and a diagonal Gaussian fitted on
            the same training kernels (:func:`~dwp.priors.report.held_out_scores`, in nats
            per kernel); ``metadata["split"]`` how to redo the split.  See
            :meth:`fit_report`.

        Raises
        ------
        ValueError
            A group too small to split, a bad fraction or option, or a ``device`` this
            machine lacks (before anything is fitted).
        """
        device = resolve_device(device)
        splits = split_bank(bank, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        fits: dict[str, VAEFit] = {}
        for i, (group, parts) in enumerate(splits.items()):
            fits[group] = fit_kernel_vae(
                parts["train"], val_kernels=parts["val"], latent_dim=latent_dim,
                architecture=architecture, hidden=hidden, seed=seed + i, progress=progress,
                desc=f"VAE {group}", device=device, **fit_options,
            )  # fmt: skip
        metadata = {
            "bank": dict(bank.metadata),
            "sources": list(bank.source_names),
            "layers": list(bank.layer_names),
            "kernels_per_group": {g: len(k) for g, k in bank.groups().items()},
            "fits": {
                g: {**fit.summary(), "n_test": len(splits[g]["test"])} for g, fit in fits.items()
            },
            "seed": seed,
            "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
        }
        prior = cls(
            {g: fit.vae for g, fit in fits.items()}, dict(bank.layer_groups),
            n_samples=n_samples, chunk_size=chunk_size, kernel_fraction=kernel_fraction,
            train_encoder=train_encoder, share_forward_sample=share_forward_sample,
            metadata=metadata,
        )  # fmt: skip
        prior.to(device)  # the VAEs are there already; whatever else the constructor made
        if test_fraction > 0:
            train = {g: parts["train"] for g, parts in splits.items()}
            # the Gaussians are fitted on the CPU (float64 covariances, as ever) and scored
            # where the VAE is: every prior of the comparison on the test kernels' device
            compared = {
                "VAE": prior,
                "kernel Gaussian": KernelGaussianPrior.fit(train).to(device),
                "diagonal Gaussian": KernelGaussianPrior.fit(train, diagonal=True).to(device),
            }
            prior.metadata["held_out"] = held_out_scores(
                compared, {g: parts["test"].to(device) for g, parts in splits.items()},
                reference="kernel Gaussian", iwae_samples=iwae_samples, seed=seed,
            )  # fmt: skip
        return prior

    def held_out(self, group: str | None = None) -> dict[str, float]:
        """The test-split scores of the fit (nats per kernel; ``group=None``: all groups):
        ``test_kernels``, ``vae`` (its importance-weighted bound), ``kernel_gaussian`` and
        ``diagonal_gaussian`` (fitted on the same training kernels), empty for a prior
        fitted without a test split."""
        held_out = self.metadata.get("held_out")
        if not held_out:
            return {}
        entry = held_out["overall"] if group is None else held_out["groups"][group]
        scores = entry["scores"]
        return {
            "test_kernels": entry["kernels"],
            "vae": scores["VAE"]["mean"],
            "kernel_gaussian": scores["kernel Gaussian"]["mean"],
            "diagonal_gaussian": scores["diagonal Gaussian"]["mean"],
        }

    def fit_report(self) -> str:
        """Markdown table: per group, the held-out log density of the test kernels in nats
        per kernel, for the VAE (its importance-weighted bound) and kernel Gaussians
        (full and diagonal covariance) fitted on the same training kernels, and the paired
        difference VAE - full Gaussian.

        A VAE that does not beat the full-covariance Gaussian learned little beyond
        correlated shrinkage, and the prior will mostly pull kernels toward zero.  A prior
        fitted without a test split has only the validation scores of its fit, which chose
        the epoch and so flatter the VAE; the table then says so.
        """
        if "held_out" in self.metadata:
            return render_scores(self.metadata["held_out"])
        fits = self.metadata.get("fits", {})
        lines = [
            "| group | kernels | VAE validation ELBO, best epoch (optimistic) | full-cov Gaussian "
            "| diagonal Gaussian | VAE - full |",
            "|---|---|---|---|---|---|",
        ]
        for group in self.groups:
            fit = fits.get(group)
            if not fit:
                lines.append(f"| {group} | - | - | - | - | - |")
                continue
            vae, base = fit["best_val_elbo"], fit["baselines"]
            n = fit["n_train"] + fit["n_val"]
            lines.append(
                f"| {group} | {n} | {vae:.3f} | {base['full']:.3f} | {base['diagonal']:.3f} "
                f"| {vae - base['full']:+.3f} |"
            )
        lines.append("(nats per kernel, on the validation kernels that chose the VAE's epoch)")
        return "\n".join(lines)

    # -- saving ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the prior (VAEs, groups, options, provenance) to one file, atomically.

        The weights are written as CPU tensors whatever device the prior is on, so the file
        loads on a machine without that device (:meth:`load` gives a CPU prior).
        """
        layer_groups = layer_groups_config(self.layer_groups)
        entries = {
            "groups": {
                g: {"config": vae.config(), "state_dict": _cpu_state_dict(vae)}
                for g, vae in self.vaes.items()
            },
            "layer_groups": layer_groups,
            "options": {
                "n_samples": self.n_samples,
                "chunk_size": self.chunk_size,
                "kernel_fraction": self.kernel_fraction,
                "train_encoder": self.train_encoder,
                "share_forward_sample": self.share_forward_sample,
                "learn_scale": self.learn_scale,
            },
            "metadata": self.metadata,
        }
        if self.log_scale_factors is not None:  # optional: files of earlier versions lack it
            entries["scale_factors"] = {
                g: float(f.detach()) for g, f in self.log_scale_factors.items()
            }
        PRIOR_FILE.save(entries, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> DeepWeightPrior:
        """Read a prior written by :meth:`save`, validating it; ``overrides`` replace saved
        options (``n_samples``, ``chunk_size``, ``train_encoder``...)."""
        return cls._from_payload(PRIOR_FILE.load(path), path, **overrides)

    @classmethod
    def _from_payload(cls, payload: Any, path: Any, **overrides: Any) -> DeepWeightPrior:
        """The prior of a checked file's contents (:meth:`load`, :func:`load_prior`)."""
        if not isinstance(payload["groups"], dict) or not isinstance(payload["layer_groups"], dict):
            raise PriorFileError(f"{path}: groups and layer_groups must be mappings")
        vaes = {}
        for group, entry in payload["groups"].items():
            try:
                vae = KernelVAE(**entry["config"])
                vae.load_state_dict(entry["state_dict"])
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise PriorFileError(f"{path}: group {group!r} is inconsistent: {error}") from error
            vaes[group] = vae
        unknown = set(payload["layer_groups"].values()) - vaes.keys()
        if unknown:
            raise PriorFileError(f"{path}: layer_groups refer to unknown groups {sorted(unknown)}")
        options = {"metadata": payload["metadata"], **payload["options"], **overrides}
        try:
            prior = cls(vaes, payload["layer_groups"] or None, **options)
        except (TypeError, ValueError) as error:
            raise PriorFileError(f"{path}: invalid prior options: {error}") from error
        factors = payload.get("scale_factors") or {}
        if prior.log_scale_factors is not None:
            with torch.no_grad():
                for group, value in factors.items():
                    if group not in prior.log_scale_factors:
                        raise PriorFileError(f"{path}: scale factor of unknown group {group!r}")
                    prior.log_scale_factors[group].fill_(float(value))
        return prior

    def extra_repr(self) -> str:
        return f"groups={self.groups}, n_samples={self.n_samples}, chunk_size={self.chunk_size}"


register_format(PRIOR_FILE, DeepWeightPrior._from_payload)
