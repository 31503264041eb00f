"""The ``kl`` section: what a learned kernel prior adds to a training step.

``dwp.kl(model)`` and its ``.backward()`` alone (no network forward) for several kernel
VAEs and U-Net widths, for the kernel Gaussian prior (one group and the 7 resolution
groups) and for the SWAG prior (rank 5, per layer), each as a ratio to the deterministic
training step of the U-Net it belongs to, measured in the same interleaved run.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import dwp
from unet3d import UNet3D, count_kernels, kernel3_layers

from ..report import markdown_table
from .layers import training_step
from .settings import HEAVY_WARMUP_STEPS, KL_TARGET, WARMUP_STEPS
from .timing import Variant, join_tables, met_cell, phase_cells, seeded_input, time_variants

__all__ = [
    "GAUSSIAN_KL_TARGET",
    "default_vae_text",
    "forward_samples",
    "kl_step",
    "kl_variants",
    "render_kl",
    "run_kl",
]


#: Largest acceptable (closed-form KL forward + backward) / (deterministic training step) of
#: the kernel Gaussian prior: a closed form has no excuse to cost more than a few per cent.
GAUSSIAN_KL_TARGET = 0.05
#: Deviation columns of the SWAG prior's row: "Pre-Train Your Loss"'s default.
SWAG_RANK = 5


def kl_step(model: nn.Module) -> tuple[Callable[[], Tensor], Callable[[Tensor], None]]:
    """Forward/backward callables of the KL bound alone: ``dwp.kl(model)``, ``.backward()``."""

    def forward() -> Tensor:
        model.zero_grad(set_to_none=True)  # leaves the parameters, so any shared sample, as is
        return dwp.kl(model)

    def backward(kl: Tensor) -> None:
        kl.backward()

    return forward, backward


def forward_samples(model: nn.Module) -> Callable[[], None]:
    """Untimed setup of a KL variant: draw every Bayesian layer's weights as its ``reparam``
    forward pass would (:meth:`~dwp.nn.BayesianLayer.sample_weight`), so that the bound
    shares them as it does inside a training step."""

    def setup() -> None:
        for _, layer in dwp.bayesian_layers(model):
            layer.sample_weight()

    return setup


def default_vae_text() -> str:
    """The MLP KernelVAE's default sizes for 3x3x3 kernels (for the configs' text)."""
    vae = dwp.KernelVAE((3, 3, 3))
    return f"hidden {vae.hidden}, latent {vae.latent_dim}"


def _dwp_network(
    net: nn.Module,
    vaes: dict[str, dwp.KernelVAE],
    layer_groups: dict[str, str] | None = None,
    kernel_fraction: float = 1.0,
) -> nn.Module:
    """``net`` with Bayesian 3x3x3 convs under a deep weight prior of ``vaes``."""
    prior = dwp.DeepWeightPrior(vaes, layer_groups, kernel_fraction=kernel_fraction)
    return dwp.bayesianize(net, prior, include=kernel3_layers(net))


def _gaussian_network(net: nn.Module, bank: dwp.KernelBank, grouped: bool) -> nn.Module:
    """``net`` with Bayesian 3x3x3 convs under a kernel Gaussian prior fitted on ``bank``
    (its 7 resolution groups, or all kernels as one group)."""
    kernels = bank.groups() if grouped else {"all": bank.kernels}
    prior = dwp.KernelGaussianPrior.fit(kernels, dict(bank.layer_groups) if grouped else None)
    return dwp.bayesianize(net, prior, include=kernel3_layers(net))


def _swag_network(net: nn.Module, rank: int) -> nn.Module:
    """``net`` with Bayesian 3x3x3 convs under a per-layer SWAG prior of ``rank`` columns,
    collected over ``rank + 1`` random perturbations of its weights (the cost of the closed
    form does not depend on the values)."""
    source = copy.deepcopy(net)
    moments = dwp.SWAGMoments.for_model(source, rank, include=kernel3_layers(source))
    for _ in range(rank + 1):
        with torch.no_grad():
            for p in source.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        moments.update(source)
    prior = dwp.SWAGPrior.from_moments(moments)
    return dwp.bayesianize(net, prior, include=kernel3_layers(net))


def kl_variants(
    seed: int, widths: Sequence[int], wide_widths: Sequence[int], x: Tensor, reps: int, heavy: int
) -> list[Variant]:
    """Deterministic training steps of both U-Nets and the KL bounds measured against them."""
    torch.manual_seed(seed)
    kernel = (3, 3, 3)
    net, wide = UNet3D(widths=widths).train(), UNet3D(widths=wide_widths).train()
    target = torch.zeros(x.shape[0], net.n_classes, *x.shape[2:])
    # The VAEs are untrained: the cost of the bound does not depend on their weights.
    bank = dwp.collect_kernels(
        net, group_by="resolution", include=kernel3_layers(net), example_input=x[:1]
    )
    groups = {g: len(k) for g, k in bank.groups().items()}
    models = {
        "kl_mlp_1vae": _dwp_network(net, {"all": dwp.KernelVAE(kernel)}),
        "kl_mlp_1vae_own": _dwp_network(net, {"all": dwp.KernelVAE(kernel)}),
        "kl_mlp_7vae": _dwp_network(
            net, {g: dwp.KernelVAE(kernel) for g in bank.group_names}, dict(bank.layer_groups)
        ),
        "kl_conv_1vae": _dwp_network(net, {"all": dwp.KernelVAE(kernel, architecture="conv")}),
        "kl_mlp_1vae_wide": _dwp_network(wide, {"all": dwp.KernelVAE(kernel)}),
        "kl_mlp_1vae_wide_own": _dwp_network(wide, {"all": dwp.KernelVAE(kernel)}),
        # not the default: an unbiased estimate on half the kernels per step
        "kl_mlp_1vae_wide_half": _dwp_network(
            wide, {"all": dwp.KernelVAE(kernel)}, kernel_fraction=0.5
        ),
        "kl_gauss_1group": _gaussian_network(net, bank, grouped=False),
        "kl_gauss_7group": _gaussian_network(net, bank, grouped=True),
        "kl_swag_r5": _swag_network(net, SWAG_RANK),
    }
    step, step_wide = "step_unet3d", "step_unet3d_wide"

    def unet_info(widths_: Sequence[int], model: nn.Module) -> dict[str, Any]:
        return {"widths": list(widths_), "kernels": count_kernels(model)}

    def vae_info(model: nn.Module, arch: str, n_vaes: int) -> dict[str, Any]:
        vae = next(m for m in model.modules() if isinstance(m, dwp.KernelVAE))
        # decoder weights are buffers in a prior: count the whole state
        size = sum(t.numel() for t in vae.state_dict().values())
        return {"architecture": arch, "vaes": n_vaes, "vae_weights_each": size}

    def dwp_variant(
        name: str, baseline: str, arch: str, n_vaes: int, shared: bool = True, **kw: Any
    ) -> Variant:
        model = models[name]
        source = wide if baseline == step_wide else net
        info = {
            "what": "dwp.kl(model) + backward",
            # in a training step the reparam forward pass has drawn the weights, and the
            # bound shares that sample; dwp.kl without a forward pass draws its own
            "weight_sample": "forward's" if shared else "own",
            **unet_info(source.widths, source),
            **vae_info(model, arch, n_vaes),
        }
        if n_vaes > 1:
            info["groups"] = groups
        return Variant(
            "kl",
            name,
            *kl_step(model),
            baseline=baseline,
            target_ratio=None if arch == "conv" else KL_TARGET,
            info=info,
            setup=forward_samples(model) if shared else None,
            **kw,
        )

    def gaussian_variant(name: str, n_groups: int, **kw: Any) -> Variant:
        prior: dict[str, Any] = {"prior": "kernel Gaussian", "gaussians": n_groups}
        if n_groups > 1:
            prior["groups"] = groups
        return closed_form_variant(name, prior, **kw)

    def closed_form_variant(name: str, prior: dict[str, Any], **kw: Any) -> Variant:
        info = {
            "what": "dwp.kl(model) + backward",
            "weight_sample": "none (closed form)",
            **unet_info(net.widths, net),
            **prior,
        }
        return Variant(
            "kl",
            name,
            *kl_step(models[name]),
            baseline=step,
            target_ratio=GAUSSIAN_KL_TARGET,
            info=info,
            **kw,
        )

    def step_variant(name: str, model: nn.Module, **kw: Any) -> Variant:
        info = {
            "what": f"deterministic UNet3D training step, input {list(x.shape)}",
            **unet_info(model.widths, model),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        return Variant(
            "kl", name, *training_step(model, x, target, bayesian=False), info=info, **kw
        )

    slow = {"reps": heavy, "warmup": HEAVY_WARMUP_STEPS}
    return [
        step_variant(step, net, reps=reps),
        dwp_variant("kl_mlp_1vae", step, "mlp", 1, reps=reps),
        dwp_variant("kl_mlp_1vae_own", step, "mlp", 1, shared=False, reps=reps),
        dwp_variant("kl_mlp_7vae", step, "mlp", len(groups), reps=reps),
        gaussian_variant("kl_gauss_1group", 1, reps=reps),
        gaussian_variant("kl_gauss_7group", len(groups), reps=reps),
        closed_form_variant("kl_swag_r5", {"prior": f"SWAG rank {SWAG_RANK}"}, reps=reps),
        dwp_variant("kl_conv_1vae", step, "conv", 1, **slow),
        step_variant(step_wide, wide, **slow),
        dwp_variant("kl_mlp_1vae_wide", step_wide, "mlp", 1, reps=reps),
        dwp_variant("kl_mlp_1vae_wide_own", step_wide, "mlp", 1, shared=False, reps=reps),
        dwp_variant("kl_mlp_1vae_wide_half", step_wide, "mlp", 1, reps=reps),
    ]


def _prior_cell(row: dict[str, Any]) -> str:
    """The prior of a row: ``7 x mlp`` VAEs, ``7 x Gaussian``, its name (``SWAG rank 5``),
    or ``-`` for a step."""
    if "architecture" in row:
        return f"{row['vaes']} x {row['architecture']} VAE"
    if "gaussians" in row:
        return f"{row['gaussians']} x Gaussian"
    return row.get("prior", "-")


def render_kl(rows: Sequence[dict[str, Any]]) -> str:
    """The ratio table and a forward/backward/memory breakdown."""
    headline = markdown_table(
        [
            "variant",
            "U-Net widths",
            "3x3x3 kernels",
            "prior",
            "weight sample",
            "reps",
            "median (s)",
            "IQR",
            "ratio vs step",
            "target",
            "met?",
        ],
        [
            [
                r["variant"],
                "-".join(map(str, r["widths"])),
                f"{r['kernels']:,}",
                _prior_cell(r),
                r.get("weight_sample", "-"),
                r["reps"],
                f"{r['median_s']:.4f}",
                f"{r['iqr_s']:.4f}",
                "baseline" if r["baseline"] == r["variant"] else f"{r['ratio']:.1%}",
                (
                    ("baseline" if r["baseline"] == r["variant"] else "none")
                    if r["target_ratio"] is None
                    else f"<= {r['target_ratio']:.0%}"
                ),
                met_cell(r),
            ]
            for r in rows
        ],
    )
    breakdown = markdown_table(
        ["variant", "ratio of", "median forward (s)", "median backward (s)", "saved (MiB)"],
        [[r["variant"], r["baseline"], *phase_cells(r)] for r in rows],
    )
    return join_tables(rows, headline, "Breakdown:", breakdown)


def run_kl(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Time the KL bounds against the deterministic steps; rows, config and tables."""
    x = seeded_input(args.seed, args.batch, args.size)
    variants = kl_variants(args.seed, args.widths, args.wide_widths, x, args.steps, args.heavy)
    rows = time_variants(variants, "kl")
    config = {
        "network": "unet3d.UNet3D",
        "widths": list(args.widths),
        "wide_widths": list(args.wide_widths),
        "bayesian_layers": "kernel3_layers(net): the 3x3x3 convs; 1x1x1 convs deterministic",
        "input_shape": list(x.shape),
        "timed": "kl_*: dwp.kl(model) then .backward() (no network forward; the variants "
        "with the forward's weight sample draw it untimed first, with BayesianLayer."
        "sample_weight, as a reparam forward pass does); step_*: "
        "deterministic training step (mse(output, 0), backward, SGD)",
        "vaes": f"untrained KernelVAE((3, 3, 3)) (mlp: default {default_vae_text()}; conv: "
        "the MRI paper's); DeepWeightPrior defaults (n_samples 1, no chunking, encoder "
        "trained, forward sample shared)",
        "groups": "kl_mlp_7vae, kl_gauss_7group: collect_kernels(group_by='resolution') on UNet3D",
        "gaussians": "KernelGaussianPrior.fit on the U-Net's own (He-initialised) 3x3x3 "
        "kernels: all as one group (kl_gauss_1group) or the 7 resolution groups; the cost "
        "of the closed form does not depend on the fitted values",
        "swag": f"kl_swag_r5: SWAGPrior (rank {SWAG_RANK}, Pre-Train Your Loss's default; one "
        "low-rank-plus-diagonal Gaussian per layer) from SWAGMoments of random perturbations "
        "of the U-Net's 3x3x3 kernels; exact KL by Woodbury and the determinant lemma",
        "steps": args.steps,
        "heavy_reps": args.heavy,
        "heavy_variants": ["kl_conv_1vae", "step_unet3d_wide"],
        "heavy_note": f"the heavy variants run {args.heavy} timed reps (after "
        f"{HEAVY_WARMUP_STEPS} warm-up) spread over the {args.steps} rounds; the others "
        f"{args.steps} (after {WARMUP_STEPS})",
        "target": f"MLP bound <= {KL_TARGET:.0%} of its U-Net's deterministic step; "
        f"kernel Gaussian and SWAG <= {GAUSSIAN_KL_TARGET:.0%}; conv VAE: no target",
    }
    return rows, config, render_kl(rows)
