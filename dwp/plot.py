"""Figures: source kernels next to samples from the fitted prior (Kuzina et al., fig. 5)."""

from __future__ import annotations

import io
import os

import torch
from torch import Tensor

from ._io import atomic_write

__all__ = ["central_slice", "plot_prior_samples"]


def central_slice(kernels: Tensor) -> Tensor:
    """2D views of kernels for display: ``(N, k)`` -> ``(N, 1, k)``, ``(N, a, b)`` as is,
    ``(N, a, b, c)`` -> the central slice along the first axis, ``(N, b, c)``."""
    if kernels.dim() == 2:
        return kernels.unsqueeze(1)
    if kernels.dim() == 3:
        return kernels
    if kernels.dim() == 4:
        return kernels[:, kernels.shape[1] // 2]
    raise ValueError(
        f"kernels must be (N, k), (N, a, b) or (N, a, b, c), got {tuple(kernels.shape)}"
    )


def plot_prior_samples(
    bank,
    prior,
    path: str | os.PathLike,
    n: int = 16,
    seed: int = 0,
    groups: list[str] | None = None,
) -> None:
    """Write a PNG: for each group, ``n`` source kernels (left) and ``n`` kernels sampled from
    the prior's VAE (right), central slices for 3D kernels, one colour scale per row.

    Parameters
    ----------
    bank
        The :class:`dwp.kernels.KernelBank` the prior was fitted on.
    prior
        A :class:`dwp.priors.DeepWeightPrior`.
    path
        Output PNG, written atomically.
    n
        Kernels shown per panel.
    seed
        Which source kernels are shown and which samples are drawn.
    groups
        Groups to show (default: all of the prior's).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = groups or prior.groups
    generator = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(
        len(groups), 2 * n, figsize=(0.6 * 2 * n + 1.5, 0.75 * len(groups) + 0.6), squeeze=False
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for row, group in enumerate(groups):
            source = bank.select(group)
            pick = torch.randperm(len(source), generator=generator)[:n]
            with torch.no_grad():
                samples = prior.vaes[group].sample(n)
            images = torch.cat([central_slice(source[pick]), central_slice(samples)])
            limit = float(images.abs().max()) or 1.0
            for col, ax in enumerate(axes[row]):
                ax.set_axis_off()
                if col < len(images) and ((col < n and col < len(pick)) or col >= n):
                    index = col if col < n else len(pick) + col - n
                    ax.imshow(images[index], cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[row][0].set_title(f"{group}: source", fontsize=7, loc="left")
            axes[row][n].set_title("prior samples", fontsize=7, loc="left")
    fig.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
