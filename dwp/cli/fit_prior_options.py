"""The options of ``dwp fit-prior`` and which ``--kind`` takes which.

Every option that belongs to some kinds only defaults to ``None``: "given" is "not
``None``", which :func:`check` holds against ``--kind`` (an option of another kind is a
usage error, not silently ignored), and a value left out reaches no library call, so the
library's own default applies; the help quotes those defaults from the library's
signatures (:func:`~dwp.cli.arguments.api_default`), so it cannot drift from them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from ..priors import (
    DeepWeightPrior,
    KernelGaussianPrior,
    LogUniformPrior,
    NormalPrior,
    PretrainedNormalPrior,
    SWAGPrior,
)
from ..vae import fit_kernel_vae
from .arguments import (
    api_default,
    finite_float,
    fraction,
    group_rule,
    kernel_shape,
    non_negative_float,
    positive_float,
    positive_int,
    shrinkage,
)
from .kinds import KINDS, Kind

__all__ = ["KERNEL_KINDS", "SCALED_KINDS", "add_parser", "check", "library_options"]

KERNEL_KINDS = ("dwp", "kernel-gaussian")
SCALED_KINDS = ("kernel-gaussian", "swag", "normal", "pretrained-normal")

_DESCRIPTION = """\
Fit a weight prior and write it to one file that dwp.priors.load_prior (and `unet3d train
--strategy prior --prior FILE`) reads, with a fit report (JSON and Markdown) and a figure.

The kernel priors (dwp, kernel-gaussian) are fitted on the spatial kernel slices of the conv
layers of SOURCE checkpoints or state dicts (torch.save files holding a state dict, or a dict
whose 'state_dict' or 'model' entry is one), or on a kernel bank saved before (--bank). A
state dict does not tell a transposed conv's weight from a conv's: leave those layers out
with --include. The swag prior is built from the SWA moments of a source training run
(--moments). normal, pretrained-normal and log-uniform are fitted from nothing: the file
holds their settings.
"""

_EPILOG = """\
kinds:
{kinds}

outputs: OUT; the report REPORT (default OUT's name with .report.json) and beside it the same
as Markdown (.md); the held-out figure FIGURE (default .report.png, kinds with held-out
scores, needs matplotlib); --samples-figure and --bank-out when asked for.

examples:
  dwp fit-prior run1/best.pt run2/best.pt --kind dwp --kernel-shape 3x3x3 --epochs 100 \\
      --min-norm 0.05 --out prior.pt
  dwp fit-prior --bank bank.pt --kind kernel-gaussian --out gaussian.pt
  dwp fit-prior --moments run1/swag.pt --held-out run2/best.pt --kind swag --scale 1000 \\
      --out swag.pt
"""


def _kinds_help() -> str:
    return "\n".join(
        f"  {kind.name:<18} {kind.cls.__name__}: {kind.summary}" for kind in KINDS.values()
    )


def add_parser(
    commands: argparse._SubParsersAction, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """Add ``fit-prior`` to the ``dwp`` subcommands, run by ``handler``; returns its parser.

    The parsed namespace also carries the parser (for :func:`check`'s usage errors),
    ``applies`` (option dest -> the kinds that take it) and ``flags`` (dest -> its flag).
    """
    parser = commands.add_parser(
        "fit-prior",
        usage="%(prog)s [SOURCE ...] --kind KIND --out OUT [options]",
        help="fit a weight prior from source networks; write the prior, a report, a figure",
        description=_DESCRIPTION,
        epilog=_EPILOG.format(kinds=_kinds_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    applies: dict[str, tuple[str, ...]] = {}  # dest -> the kinds that take the option
    flags: dict[str, str] = {}  # dest -> its flag, for messages

    def option(group: Any, flag: str, kinds: tuple[str, ...], **kwargs: Any) -> None:
        kwargs.setdefault("default", None)
        action = group.add_argument(flag, **kwargs)
        applies[action.dest], flags[action.dest] = kinds, flag

    vae_fit, dwp_fit = fit_kernel_vae, DeepWeightPrior.fit
    parser.add_argument(
        "sources", nargs="*", metavar="SOURCE",
        help="checkpoint or state-dict files of trained source networks (kernel kinds)",
    )  # fmt: skip
    parser.add_argument(
        "--kind", required=True, choices=list(KINDS),
        help="the prior to fit (see 'kinds' below)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, metavar="OUT", help="the prior file")

    inputs = parser.add_argument_group("inputs besides SOURCE")
    option(
        inputs,
        "--bank",
        KERNEL_KINDS,
        type=Path,
        metavar="BANK",
        help="a kernel bank file (dwp.KernelBank.save, --bank-out) instead of SOURCE files",
    )
    option(
        inputs,
        "--moments",
        ("swag",),
        type=Path,
        metavar="FILE",
        help="swag: the SWAG moments file of a source run (dwp.SWAGMoments.save, "
        "unet3d train --swag-rank)",
    )
    option(
        inputs,
        "--held-out",
        ("swag",),
        type=Path,
        action="append",
        metavar="CHECKPOINT",
        help="swag: a network kept out of the moments, to score the prior on (repeat)",
    )

    bank = parser.add_argument_group("the kernel bank (dwp, kernel-gaussian; dwp.collect_kernels)")
    option(
        bank,
        "--include",
        KERNEL_KINDS,
        action="append",
        metavar="PATTERN",
        help="only conv layers whose name matches this glob (repeat; a pattern matching no "
        "layer is an error; 1x1 convs only when named exactly); default: every conv "
        "with a spatial kernel",
    )
    option(
        bank,
        "--kernel-shape",
        KERNEL_KINDS,
        type=kernel_shape,
        metavar="KxK[xK]",
        help="only layers with this kernel shape, e.g. 3x3x3 (default: that of the first "
        "layer; layers of another shape are then an error)",
    )
    option(
        bank,
        "--group-by",
        KERNEL_KINDS,
        choices=("layer", "all", "resolution"),
        help="one prior per layer (default), one for all layers, or per input resolution "
        "(needs the network itself: build that bank in Python and pass --bank)",
    )
    option(
        bank,
        "--group",
        KERNEL_KINDS,
        type=group_rule,
        action="append",
        metavar="PATTERN=GROUP",
        help="put the layers matching PATTERN into GROUP (repeat; the first match wins; a "
        "layer matching none is an error); instead of --group-by",
    )
    option(
        bank,
        "--min-norm",
        KERNEL_KINDS,
        type=non_negative_float,
        metavar="NORM",
        help="prune kernels of L2 norm below NORM (KernelBank.prune)",
    )
    option(
        bank,
        "--bank-out",
        KERNEL_KINDS,
        type=Path,
        metavar="FILE",
        help="also write the kernel bank to FILE",
    )

    split = parser.add_argument_group("the held-out split (dwp, kernel-gaussian)")
    option(
        split,
        "--val-fraction",
        KERNEL_KINDS,
        type=fraction(low_open=True, high_open=True),
        metavar="F",
        help="share of each group's kernels for the VAE's early stopping and epoch choice "
        f"(default {api_default(dwp_fit, 'val_fraction')})",
    )
    option(
        split,
        "--test-fraction",
        KERNEL_KINDS,
        type=fraction(low_open=False, high_open=True),
        metavar="F",
        help="share of each group's kernels held out for the report only, 0 for none "
        f"(default {api_default(dwp_fit, 'test_fraction')})",
    )
    option(
        split,
        "--seed",
        KERNEL_KINDS,
        type=int,
        metavar="N",
        help="seeds the split and the VAE fits: the same seed, the same prior "
        f"(default {api_default(dwp_fit, 'seed')})",
    )

    vae = parser.add_argument_group("the kernel VAEs (dwp; DeepWeightPrior.fit, fit_kernel_vae)")
    dwp_only = ("dwp",)
    option(
        vae,
        "--latent-dim",
        dwp_only,
        type=positive_int,
        metavar="N",
        help="latent size (default: 6 for 3D kernels, 4 for 2D of 5x5 and up, else 2)",
    )
    option(
        vae,
        "--architecture",
        dwp_only,
        choices=("mlp", "conv"),
        help=f"encoder/decoder (default {api_default(dwp_fit, 'architecture')})",
    )
    option(
        vae,
        "--hidden",
        dwp_only,
        type=positive_int,
        metavar="N",
        help=f"hidden width (default {api_default(dwp_fit, 'hidden')})",
    )
    option(
        vae,
        "--epochs",
        dwp_only,
        type=positive_int,
        metavar="N",
        help=f"epoch budget per group (default {api_default(vae_fit, 'epochs')})",
    )
    option(
        vae,
        "--batch-size",
        dwp_only,
        type=positive_int,
        metavar="N",
        help=f"kernels per step (default {api_default(vae_fit, 'batch_size')})",
    )
    option(
        vae,
        "--lr",
        dwp_only,
        type=positive_float,
        help=f"Adam's learning rate (default {api_default(vae_fit, 'lr')})",
    )
    option(
        vae,
        "--early-stopping",
        dwp_only,
        type=positive_int,
        metavar="N",
        help="stop after N epochs without validation improvement "
        f"(default {api_default(vae_fit, 'early_stopping')})",
    )
    option(
        vae,
        "--iwae-samples",
        dwp_only,
        type=positive_int,
        metavar="K",
        help=f"K of the VAE's held-out bound (default {api_default(dwp_fit, 'iwae_samples')})",
    )
    option(
        vae,
        "--n-samples",
        dwp_only,
        type=positive_int,
        metavar="N",
        help="Monte Carlo samples of the prior's KL bound per step "
        f"(default {api_default(dwp_fit, 'n_samples')})",
    )
    option(
        vae,
        "--chunk-size",
        dwp_only,
        type=positive_int,
        metavar="N",
        help="the prior's KL over at most N kernels at once (default: all)",
    )
    option(
        vae,
        "--kernel-fraction",
        dwp_only,
        type=fraction(low_open=True, high_open=False),
        metavar="F",
        help="the prior's KL on a random share of each group's kernels per step "
        f"(default {api_default(dwp_fit, 'kernel_fraction')})",
    )
    option(
        vae,
        "--freeze-encoder",
        dwp_only,
        action="store_const",
        const=True,
        help="freeze the VAE encoders in the prior (default: they keep training)",
    )
    option(
        vae,
        "--device",
        dwp_only,
        metavar="DEVICE",
        help="where the VAEs are fitted and scored: cpu, cuda, cuda:N or mps, checked "
        f"before any work (default {api_default(dwp_fit, 'device')}); the file loads on a CPU",
    )
    option(
        vae,
        "--samples-figure",
        dwp_only,
        type=Path,
        metavar="PNG",
        help="also draw source kernels next to prior samples (dwp.plot.plot_prior_samples)",
    )

    other = parser.add_argument_group("the other kinds")
    option(
        other,
        "--shrinkage",
        ("kernel-gaussian",),
        type=shrinkage,
        metavar="S",
        help="kernel-gaussian: 'ledoit-wolf' or an intensity in [0, 1] "
        f"(default {api_default(KernelGaussianPrior.fit, 'shrinkage')})",
    )
    option(
        other,
        "--diagonal",
        ("kernel-gaussian",),
        action="store_const",
        const=True,
        help="kernel-gaussian: variances only",
    )
    option(
        other,
        "--scale",
        ("swag", "normal"),
        type=positive_float,
        metavar="C",
        help="swag: the covariance's factor c "
        f"(default {api_default(SWAGPrior.from_moments, 'scale')}); normal: the "
        f"standard deviation (default {api_default(NormalPrior, 'scale')})",
    )
    option(
        other,
        "--loc",
        ("normal",),
        type=finite_float,
        metavar="MEAN",
        help=f"normal: the mean (default {api_default(NormalPrior, 'loc')})",
    )
    option(
        other,
        "--scale-factor",
        ("pretrained-normal",),
        type=non_negative_float,
        metavar="D",
        help="pretrained-normal: standard deviation per |w0| "
        f"(default {api_default(PretrainedNormalPrior, 'scale_factor')})",
    )
    option(
        other,
        "--min-scale",
        ("pretrained-normal",),
        type=positive_float,
        metavar="EPS",
        help="pretrained-normal: added to the standard deviation "
        f"(default {api_default(PretrainedNormalPrior, 'min_scale')})",
    )
    option(
        other,
        "--max-log-alpha",
        ("log-uniform",),
        type=finite_float,
        metavar="A",
        help="log-uniform: clip of log alpha "
        f"(default {api_default(LogUniformPrior, 'max_log_alpha')})",
    )
    option(
        other,
        "--learn-scale",
        SCALED_KINDS,
        action="store_const",
        const=True,
        help="learn the prior's scale factor by empirical Bayes when training (kinds "
        f"{', '.join(SCALED_KINDS)}; a dwp prior chooses it when loaded: "
        "unet3d train --learn-scale)",
    )

    outputs = parser.add_argument_group("outputs")
    option(
        outputs,
        "--report",
        tuple(KINDS),
        type=Path,
        metavar="REPORT",
        help="the JSON report (default: OUT's name with .report.json); Markdown beside it",
    )
    option(
        outputs,
        "--figure",
        (*KERNEL_KINDS, "swag"),
        type=Path,
        metavar="FIGURE",
        help="the held-out figure (default: OUT's name with .report.png)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=handler, parser=parser, applies=applies, flags=flags)
    return parser


# -- checking the command line ------------------------------------------------------------
def check(args: argparse.Namespace, kind: Kind) -> None:
    """Usage errors (argparse's message and status 2) for options that do not fit ``kind``."""
    error = args.parser.error
    for dest, kinds in args.applies.items():
        if getattr(args, dest) is not None and kind.name not in kinds:
            takes = ", ".join(kinds)
            error(
                f"{args.flags[dest]} does not apply to --kind {kind.name} (it applies to {takes})"
            )
    if kind.source == "kernels":
        if args.sources and args.bank is not None:
            error("give SOURCE files or --bank, not both")
        if not args.sources and args.bank is None:
            error(f"--kind {kind.name} needs SOURCE checkpoint / state-dict files or --bank")
        if args.bank is not None:
            for dest in ("include", "kernel_shape", "group_by", "group"):
                if getattr(args, dest) is not None:
                    error(
                        f"{args.flags[dest]} selects from SOURCE files; a --bank holds kernels "
                        "collected already (--min-norm prunes it)"
                    )
        if args.group is not None and args.group_by is not None:
            error("give --group-by or --group, not both")
        if args.group_by == "resolution":
            error(
                "--group-by resolution needs a forward pass of the network, which a "
                "checkpoint does not hold: collect that bank in Python "
                "(dwp.collect_kernels(..., group_by='resolution', template=net, "
                "example_input=x)), save it with bank.save(FILE) and pass --bank FILE"
            )
    elif args.sources:
        needs = {
            "moments": "the SWAG moments of a source run (--moments FILE)",
            "nothing": "nothing",
        }[kind.source]
        error(f"--kind {kind.name} takes no SOURCE: it is made from {needs}")
    if kind.source == "moments" and args.moments is None:
        error(f"--kind {kind.name} needs --moments FILE (dwp.SWAGMoments.save, unet3d train "
              "--swag-rank)")  # fmt: skip
    if kind.name == "swag" and args.figure is not None and not args.held_out:
        error("--figure for --kind swag needs --held-out networks to score the prior on")
    if args.figure is not None and args.test_fraction == 0:
        error("--figure draws the held-out scores, and --test-fraction 0 holds out nothing")
    if kind.name == "kernel-gaussian" and args.diagonal and args.shrinkage is not None:
        error("--shrinkage does not apply to --diagonal (a diagonal Gaussian is not shrunk)")
    if args.device is not None:
        # the library's own check, here so a missing GPU is a usage error before the sources
        # are read; the string itself goes on to DeepWeightPrior.fit (and into the report)
        try:
            resolve_device(args.device, name="--device")
        except ValueError as problem:
            error(str(problem))


def library_options(args: argparse.Namespace, kind: Kind) -> dict[str, Any]:
    """The library keyword arguments the user gave for ``kind`` (and none other)."""
    not_library = {
        "bank", "moments", "held_out", "include", "kernel_shape", "group_by", "group",
        "min_norm", "bank_out", "samples_figure", "report", "figure",
    }  # fmt: skip
    options = {
        dest: getattr(args, dest)
        for dest, kinds in args.applies.items()
        if kind.name in kinds and dest not in not_library and getattr(args, dest) is not None
    }
    if options.pop("freeze_encoder", None):
        options["train_encoder"] = False
    return options
