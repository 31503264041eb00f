"""The README's picture: central axial slices of a source and a target subject with labels.

``python -m cohorts.figure --seed 0`` writes ``benchmarks/results/cohorts.png``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cohorts.subjects import subject
from dwp.extras import add_version_argument

__all__ = ["make_figure"]


def make_figure(
    out: str | os.PathLike[str] = "benchmarks/results/cohorts.png",
    resolution: float = 2,
    seed: int = 0,
) -> Path:
    """Draw subject 0 of ``ms_source`` and ``tumour_target``; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # file output only; no display on the machines this runs on
    from matplotlib import colors
    from matplotlib.figure import Figure

    rows = []
    for cohort, title in (
        ("ms_source", "source: MS-like, FLAIR"),
        ("tumour_target", "target: tumour, T2"),
    ):
        s = subject(cohort, 0, resolution, seed)
        label = s["label"]
        # The axial slice through most of the lesion, so that the labels are visible.
        z = int(np.argmax((label > 0).sum(axis=(0, 1))))
        rows.append((title, s["image"][:, :, z].T, label[:, :, z].T))

    cmap = colors.ListedColormap(["none", "#e41a1c", "#ffd92f", "#4daf4a"])
    fig = Figure(figsize=(7.5, 7.2), dpi=110)
    axes = fig.subplots(2, 2)
    for (title, image, label), (ax_image, ax_label) in zip(rows, axes, strict=True):
        vmax = float(np.percentile(image, 99.5))
        for ax in (ax_image, ax_label):
            ax.imshow(image, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            ax.set_axis_off()
        masked = np.ma.masked_equal(label, 0)
        ax_label.imshow(
            masked,
            cmap=cmap,
            norm=colors.NoNorm(),
            origin="lower",
            alpha=0.6,
            interpolation="nearest",
        )
        ax_image.set_title(title, fontsize=10)
        ax_label.set_title(
            "labels" + (" (core, rim, oedema)" if "tumour" in title else ""), fontsize=10
        )
    fig.suptitle(
        f"Synthetic subjects on the MNI ICBM152 anatomy ({resolution:g} mm, seed {seed})",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cohorts.figure [--out PNG] [--resolution MM] [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cohorts.figure", description=__doc__.splitlines()[0]
    )
    add_version_argument(parser)
    parser.add_argument("--out", default="benchmarks/results/cohorts.png")
    parser.add_argument("--resolution", type=float, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_figure(args.out, args.resolution, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
