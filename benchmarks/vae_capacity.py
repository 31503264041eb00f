"""How wide must the kernel VAE be?  Held-out ELBO and KL-bound cost per hidden width.

The MLP kernel VAE's hidden width sets both how much structure the deep weight prior can
learn and what its KL bound costs on every training step (the bound's memory traffic is
mostly the hidden activations of 4 layers).  This benchmark fits
:func:`dwp.fit_kernel_vae` with several widths on

* ``edges``: synthetic 3x3x3 kernels on a nonlinear 5-dimensional manifold -- a signed,
  soft step ``a * tanh(s * (n . x - c))`` across the kernel grid, with a random direction
  ``n``, steepness ``s``, offset ``c`` and amplitude ``a``, plus a little noise.  Structure a
  Gaussian cannot represent, the kind the prior exists to capture;
* ``gaussian``: a control, correlated Gaussian kernels, for which the full-covariance
  Gaussian is the exact model and no VAE can do better;
* ``--bank PATH`` (optional): a saved :class:`dwp.KernelBank`, all groups pooled, e.g. the
  transfer benchmark's ``runs/transfer/prior-*/bank.pt``,

and reports each width's held-out ELBO (nats per kernel, mean over seeds) against the
full-covariance Gaussian, then times the DWP bound (forward + backward, ``dwp.kl`` of a
256 -> 256 Bayesian 3x3x3 conv, 65,536 kernels: the widest layer of the 4x wider U-Net)
per width, interleaved in one process.

Usage::

    python -m benchmarks.vae_capacity --seed 0
    python -m benchmarks.vae_capacity --seed 0 --bank runs/transfer/prior-*/bank.pt

About 8 minutes on 2 cores with the defaults (the fits run on one torch thread, the timing
on all).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import dwp
from dwp.extras import add_version_argument

from .report import DEFAULT_OUT_DIR, markdown_table, write_results

KERNEL = (3, 3, 3)


def edge_kernels(n: int, *, noise: float = 0.005, seed: int = 0) -> Tensor:
    """``n`` synthetic 3x3x3 kernels: soft signed steps across the kernel grid.

    Kernel ``i`` is ``a_i * tanh(s_i * (n_i . x - c_i)) + noise`` at the 27 grid points
    ``x`` in {-1, 0, 1}^3, with ``n_i`` uniform on the unit sphere, ``s_i ~ U(0.5, 3)``,
    ``c_i ~ U(-1, 1)``, ``a_i ~ N(0, 0.1^2)`` and i.i.d. ``N(0, noise^2)`` per entry.

    Returns
    -------
    Tensor
        ``(n, 3, 3, 3)``, float32; the same ``seed`` gives the same kernels.
    """
    g = torch.Generator().manual_seed(seed)
    axis = torch.tensor([-1.0, 0.0, 1.0])
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(27, 3)
    direction = torch.randn(n, 3, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    steepness = 0.5 + 2.5 * torch.rand(n, 1, generator=g)
    offset = 2.0 * torch.rand(n, 1, generator=g) - 1.0
    amplitude = 0.1 * torch.randn(n, 1, generator=g)
    kernels = amplitude * torch.tanh(steepness * (direction @ grid.T - offset))
    return (kernels + noise * torch.randn(n, 27, generator=g)).reshape(n, *KERNEL)


def gaussian_kernels(n: int, *, seed: int = 0) -> Tensor:
    """``n`` 3x3x3 kernels from one correlated zero-mean Gaussian (a random covariance
    with entries' scale ~0.1): the control where a full-covariance Gaussian is exact."""
    g = torch.Generator().manual_seed(seed)
    factor = 0.1 * torch.randn(27, 27, generator=g) / 27**0.5
    cov_root = factor + 0.02 * torch.eye(27)
    return (torch.randn(n, 27, generator=g) @ cov_root.T).reshape(n, *KERNEL)


def fit_rows(
    name: str, kernels: Tensor, widths: Sequence[int], seeds: Sequence[int], epochs: int
) -> list[dict[str, Any]]:
    """One record per (width, seed): the held-out ELBO and the Gaussian baselines."""
    rows = []
    for hidden in widths:
        for seed in seeds:
            start = time.perf_counter()
            fit = dwp.fit_kernel_vae(
                kernels, hidden=hidden, epochs=epochs, seed=seed, progress=False
            )
            rows.append(
                {
                    "table": "fit",
                    "bank": name,
                    "kernels": len(kernels),
                    "hidden": hidden,
                    "seed": seed,
                    "held_out_elbo": fit.best_val_elbo,
                    "full_gaussian": fit.baselines["full"],
                    "diagonal_gaussian": fit.baselines["diagonal"],
                    "epochs_run": len(fit.history),
                    "stopped": fit.stopped,
                    "fit_s": time.perf_counter() - start,
                }
            )
    return rows


def bound_cost(widths: Sequence[int], channels: int, reps: int, seed: int) -> list[dict[str, Any]]:
    """Median seconds of ``dwp.kl(layer)`` + backward per VAE width, interleaved.

    ``layer`` is a Bayesian ``channels -> channels`` 3x3x3 conv under a deep weight prior
    of an untrained VAE of that width (the cost does not depend on the VAE's weights).
    """
    torch.manual_seed(seed)
    layers = {
        hidden: dwp.bayesianize(
            torch.nn.Conv3d(channels, channels, 3),
            dwp.DeepWeightPrior({"all": dwp.KernelVAE(KERNEL, hidden=hidden)}),
        )
        for hidden in widths
    }
    times: dict[int, list[float]] = {hidden: [] for hidden in widths}
    for rep in range(reps + 2):  # two warm-up rounds
        for hidden, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            dwp.kl(layer).backward()
            if rep >= 2:
                times[hidden].append(time.perf_counter() - start)
    return [
        {
            "table": "cost",
            "hidden": hidden,
            "kernels": channels * channels,
            "median_s": statistics.median(times[hidden]),
            "reps": reps,
        }
        for hidden in widths
    ]


def render(fits: Sequence[dict[str, Any]], costs: Sequence[dict[str, Any]]) -> str:
    """Markdown: held-out ELBO per bank and width (mean over seeds), then the bound's cost."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in fits:
        groups.setdefault((row["bank"], row["hidden"]), []).append(row)
    elbo_rows = []
    for (bank, hidden), rows in groups.items():
        elbos = [r["held_out_elbo"] for r in rows]
        full = statistics.mean(r["full_gaussian"] for r in rows)
        elbo_rows.append(
            [
                bank,
                f"{rows[0]['kernels']:,}",
                hidden,
                len(rows),
                f"{statistics.mean(elbos):.2f}",
                f"{min(elbos):.2f} - {max(elbos):.2f}",
                f"{full:.2f}",
                f"{statistics.mean(elbos) - full:+.2f}",
            ]
        )
    elbo_table = markdown_table(
        [
            "bank",
            "kernels",
            "hidden",
            "seeds",
            "held-out ELBO (nats / kernel)",
            "range over seeds",
            "full-cov Gaussian",
            "VAE - Gaussian",
        ],
        elbo_rows,
    )
    default = dwp.KernelVAE(KERNEL).hidden
    reference = next((c["median_s"] for c in costs if c["hidden"] == default), None)
    cost_table = markdown_table(
        ["hidden", "kernels", "reps", "bound forward + backward (ms)", f"vs hidden {default}"],
        [
            [
                c["hidden"],
                f"{c['kernels']:,}",
                c["reps"],
                f"{1e3 * c['median_s']:.1f}",
                "-" if reference is None else f"{c['median_s'] / reference:.2f}x",
            ]
            for c in costs
        ],
    )
    return (
        "## Held-out ELBO of the fitted kernel VAE\n\n"
        f"{elbo_table}\n\n"
        "## Cost of the DWP bound per step\n\n"
        f"{cost_table}\n"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vae_capacity",
        description="Held-out ELBO and KL-bound cost of the MLP kernel VAE per hidden width.",
    )
    add_version_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="banks, fits and timing (default 0)")
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[16, 32, 64], help="widths (default 16 32 64)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="fits per width and bank (default 2)")
    parser.add_argument(
        "--kernels", type=int, default=30_000, help="synthetic kernels per bank (default 30000)"
    )
    parser.add_argument(
        "--epochs", type=int, default=100, help="epoch budget per fit (default 100)"
    )
    parser.add_argument(
        "--bank", type=Path, default=None, help="a saved dwp.KernelBank to add (groups pooled)"
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=256,
        help="the timed conv is channels -> channels (default 256: 65,536 kernels)",
    )
    parser.add_argument("--reps", type=int, default=15, help="timed bound reps (default 15)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the fits (default 1: batches of 256 kernels are too small "
        "to share); the bound is timed on torch's default thread count, as in training",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="results folder")
    parser.add_argument("--name", default="vae_capacity", help="base name of the result files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Fit, time, write ``<out>/<name>.json`` and ``.md``.  Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.hidden) < 1 or min(args.seeds, args.kernels, args.epochs, args.reps) < 1:
        parser.error("--hidden, --seeds, --kernels, --epochs and --reps must be positive")
    if args.bank is not None and not args.bank.is_file():
        parser.error(f"--bank {args.bank}: no such file")
    start = time.perf_counter()
    banks = {
        "edges": edge_kernels(args.kernels, seed=args.seed),
        "gaussian": gaussian_kernels(args.kernels, seed=args.seed),
    }
    if args.bank is not None:
        banks[f"{args.bank.parent.name}/{args.bank.name}"] = dwp.KernelBank.load(args.bank).kernels
    seeds = [args.seed + i for i in range(args.seeds)]
    timing_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    fits = [
        row
        for name, k in banks.items()
        for row in fit_rows(name, k, args.hidden, seeds, args.epochs)
    ]
    torch.set_num_threads(timing_threads)
    costs = bound_cost(args.hidden, args.channels, args.reps, args.seed)
    config = {
        "seed": args.seed,
        "hidden": args.hidden,
        "seeds": seeds,
        "epochs": args.epochs,
        "banks": {name: len(k) for name, k in banks.items()},
        "fit": "dwp.fit_kernel_vae(kernels, hidden=H, epochs=E, seed=S); other settings "
        "default (latent 6, batch 256, Adam 1e-3, 10% held out)",
        "fit_threads": args.threads,
        "timing": f"dwp.kl(bayesianize(Conv3d({args.channels}, {args.channels}, 3), "
        "DeepWeightPrior({'all': KernelVAE((3, 3, 3), hidden=H)}))).backward(), "
        "widths interleaved, 2 warm-up rounds",
        "timing_threads": timing_threads,
        "wall_s": time.perf_counter() - start,
    }
    markdown = render(fits, costs)
    command = shlex.join(["python", "-m", "benchmarks.vae_capacity", *argv])
    write_results(args.name, config, [*fits, *costs], markdown, args.out, command=command)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
