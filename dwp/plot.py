"""Figures: source kernels next to samples from the fitted prior (Kuzina et al., fig. 5)."""

from __future__ import annotations

import io
import os

import torch
from torch import Tensor

from .io import atomic_write

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
    """Write a PNG: for each group, up to ``n`` source kernels (left) and ``n`` kernels
    sampled from the prior's VAE (right), central slices for 3D kernels, one symmetric
    colour scale per row.

    Uses matplotlib's object-oriented API only: the caller's pyplot state and backend are
    left alone, and nothing is written unless the whole figure was drawn.

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(groups or prior.groups)
    unknown = [g for g in groups if g not in prior.vaes]
    if unknown:
        raise KeyError(f"groups {unknown} are not in the prior (its groups: {prior.groups})")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for group in groups:
            source = bank.select(group)
            pick = torch.randperm(len(source), generator=generator)[:n]
            samples = prior.vaes[group].sample(n)
            rows.append((group, central_slice(source[pick]), central_slice(samples)))

    fig = Figure(figsize=(0.6 * 2 * n + 1.5, 0.75 * len(groups) + 0.6))
    axes = fig.subplots(len(groups), 2 * n, squeeze=False)
    for ax_row, (group, sources, samples) in zip(axes, rows, strict=True):
        limit = float(torch.cat([sources, samples]).abs().max()) or 1.0
        for ax in ax_row:
            ax.set_axis_off()
        for ax, image in zip(ax_row[:n], sources, strict=False):
            ax.imshow(image.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        for ax, image in zip(ax_row[n:], samples, strict=True):
            ax.imshow(image.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax_row[0].set_title(f"{group}: source", fontsize=7, loc="left")
        ax_row[n].set_title("prior samples", fontsize=7, loc="left")
    fig.tight_layout(pad=0.2)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
