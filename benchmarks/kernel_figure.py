"""The README's kernel figure: source kernels next to samples from the fitted deep weight prior.

Trains the 2D toy source nets of :mod:`benchmarks.toy` (denoisers of oriented bars, the same
nets as ``tests/test_transfer_end_to_end.py``), collects their 5x5 kernels, drops the
near-dead ones (``--min-norm``; the test keeps them), fits a :class:`dwp.DeepWeightPrior`
and writes

* ``<out>`` (default ``benchmarks/results/dwp_kernels.png``): source kernels (left) and
  kernels sampled from the prior's VAE (right), by :func:`dwp.plot.plot_prior_samples`;
* ``<out stem>.json`` and ``<out stem>.md`` beside it: the fit report (the VAE's held-out
  ELBO per kernel next to diagonal and full-covariance Gaussians), the bank summary and the
  mean VAE ELBO of the source kernels, of prior samples and of randomly initialised kernels.

Usage::

    python -m benchmarks.kernel_figure --seed 0
    python -m benchmarks.kernel_figure --seed 1 --out /tmp/kernels.png

About 15 s on 2 cores (one torch thread: see ``--threads``).

The prior samples are draws w ~ p(w | z), decoder noise included (its per-pixel std, ~0.04,
is close to the kernels' own pixel scale), so they look noisier than the source kernels
while keeping their coarse shapes: signed blobs and short bars.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import dwp
from dwp.extras import add_version_argument
from dwp.plot import plot_prior_samples

from . import toy
from .report import DEFAULT_OUT_DIR, markdown_table, write_results

DEFAULT_OUT = DEFAULT_OUT_DIR / "dwp_kernels.png"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_figure",
        description="Fit a deep weight prior to the kernels of toy 2D denoisers and plot "
        "source kernels next to prior samples.",
    )
    add_version_argument(parser)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="source nets get seeds seed..seed+2; also the data, the VAE fit and the figure",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})"
    )
    parser.add_argument("--n", type=int, default=12, help="kernels per panel (default 12)")
    parser.add_argument(
        "--source-steps", type=int, default=600, help="AdamW steps per source net (default 600)"
    )
    parser.add_argument(
        "--min-norm",
        type=float,
        default=0.1,
        help="drop near-dead kernels of L2 norm below this before fitting (default 0.1; "
        "0 keeps all): with weight decay, over half the second layer's kernels are ~0.001",
    )
    parser.add_argument(
        "--epochs", type=int, default=150, help="kernel-VAE epoch budget (default 150)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the toy's tensors are tiny, and more "
        "threads only add synchronisation -- 10x slower on 2 busy cores)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be positive")
    if args.min_norm < 0:
        parser.error("--min-norm must be >= 0")
    if args.source_steps < 1 or args.epochs < 1 or args.threads < 1:
        parser.error("--source-steps, --epochs and --threads must be positive")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must be a .png file, got {args.out}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train, fit, plot; write the PNG and the fit report.  Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seeds = (args.seed, args.seed + 1, args.seed + 2)
    nets = toy.train_source_nets(seeds=seeds, data_seed=args.seed, steps=args.source_steps)
    bank = toy.source_bank(nets)
    if args.min_norm > 0:
        bank = bank.prune(args.min_norm)
    prior = toy.fit_prior(bank, seed=args.seed, epochs=args.epochs)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_prior_samples(bank, prior, args.out, n=args.n, seed=args.seed)

    rows = []
    for group in prior.groups:
        vae, fit, held_out = prior.vaes[group], prior.metadata["fits"][group], prior.held_out(group)
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            with torch.no_grad():
                samples = vae.sample(len(bank.select(group)))
            random_init = dwp.collect_kernels(toy.make_net(args.seed + 1000), group_by="all")
        rows.append(
            {
                "group": group,
                "kernels": len(bank.select(group)),
                "test_kernels": held_out["test_kernels"],
                "vae_held_out_elbo": held_out["vae"],
                "full_gaussian": held_out["kernel_gaussian"],
                "diagonal_gaussian": held_out["diagonal_gaussian"],
                "epochs": fit["epochs"],
                "stopped": fit["stopped"],
                "elbo_source_kernels": toy.mean_kernel_elbo(vae, bank.select(group)),
                "elbo_prior_samples": toy.mean_kernel_elbo(vae, samples),
                "elbo_random_init_kernels": toy.mean_kernel_elbo(vae, random_init.kernels),
            }
        )
    scores = markdown_table(
        ["group", "source kernels", "prior samples", "random-init kernels"],
        [
            [
                r["group"],
                f"{r['elbo_source_kernels']:.2f}",
                f"{r['elbo_prior_samples']:.2f}",
                f"{r['elbo_random_init_kernels']:.2f}",
            ]
            for r in rows
        ],
    )
    table = (
        f"![source kernels and prior samples]({args.out.name})\n\n"
        f"Fit (nats per kernel, held out):\n\n{prior.fit_report()}\n\n"
        f"Mean VAE ELBO per kernel (nats, all kernels of the group):\n\n{scores}\n\n"
        f"Kernel bank:\n\n{bank.summary()}"
    )
    config = {
        "seed": args.seed,
        "source_seeds": list(seeds),
        "source_steps": args.source_steps,
        "source_task": {"images": 512, **toy.SOURCE},
        "network": "Conv2d(1, 8, 5) -> ReLU -> Conv2d(8, 8, 5) -> ReLU -> Conv2d(8, 1, 1)",
        "group_by": "all",
        "min_norm": args.min_norm,
        "fit_options": {**toy.FIT_OPTIONS, "epochs": args.epochs},
        "panels": args.n,
        "threads": args.threads,
        "figure": args.out.name,
        "total_wall_s": time.perf_counter() - start,
    }
    command = shlex.join(["python", "-m", "benchmarks.kernel_figure", *argv])
    json_path, md_path = write_results(
        args.out.stem, config, rows, table, args.out.parent, command=command
    )
    print(table)
    print(f"\ntotal {config['total_wall_s']:.1f} s; wrote {args.out}, {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
