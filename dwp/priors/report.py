"""A fair fit report: kernel priors scored on the same held-out kernels, in nats per kernel.

A prior fitted on source kernels is judged by the log density it gives kernels it has not
seen.  For the comparison to be fair every prior is scored on the *same* kernels, and on
kernels that took part in no choice: not in fitting, not in early stopping, not in the
learning-rate schedule, not in picking the best epoch (a score on kernels that chose the
epoch is the maximum of noisy estimates, biased upward).  The scores are per-kernel means
of

- log p(w), exactly, for priors with a closed-form density (the kernel Gaussians);
- a lower bound on log p(w) for implicit priors (the deep weight prior's VAE): the
  importance-weighted bound with K samples (:meth:`dwp.KernelVAE.iwae`, Burda et al.
  2016), tighter than the single-sample ELBO (up to 1.2 nats per kernel on the transfer
  benchmark's VAEs, where K = 64 is within 0.05 of K = 512), so a VAE is not penalised
  for the looseness of its bound more than it must be.

Differences against a reference prior are paired (the same kernels), so their standard
errors are those of the per-kernel differences, much smaller than either score's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..kernel_bank import KernelBank
from ..vae import split_kernels
from .base import Prior
from .groups import KernelGroups

__all__ = [
    "IWAE_SAMPLES",
    "fit_report",
    "held_out_scores",
    "kernel_scores",
    "render_scores",
    "split_bank",
]

#: Importance samples of the bound of implicit priors.  Measured on the transfer
#: benchmark's 7 group VAEs (test kernels): K = 64 is within 0.002-0.05 nats per kernel of
#: K = 512 and 0.01-1.2 above the single-sample ELBO.
IWAE_SAMPLES = 64
#: Kernels scored at once (the IWAE holds K x chunk decoder outputs).
_CHUNK = 1024


def split_bank(
    bank: KernelBank, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, dict[str, Tensor]]:
    """Each group's kernels split into ``"train"``, ``"val"`` and ``"test"`` parts.

    Group ``i`` (in the bank's order) is split by one permutation seeded with
    ``seed + i`` (:func:`dwp.vae.split_kernels`): ``round(test_fraction * N)`` test kernels
    first, then ``round(val_fraction * N)`` validation kernels (at least one each when the
    fraction is positive), the rest for training.  The split of
    :meth:`dwp.DeepWeightPrior.fit`, so its test kernels can be rebuilt from the bank and
    ``metadata["split"]``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    splits = {}
    for i, (group, kernels) in enumerate(bank.groups().items()):
        generator = torch.Generator().manual_seed(seed + i)
        fractions = {"test_fraction": test_fraction, "val_fraction": val_fraction}
        try:
            parts = split_kernels(kernels, fractions, generator)
        except ValueError as error:
            raise ValueError(
                f"group {group!r} of the kernel bank has {len(kernels)} kernel(s) (after "
                f"pruning: {bank.metadata.get('min_norm')}): {error}; lower the norm "
                f"threshold or regroup"
            ) from error
        splits[group] = {
            "train": parts["train"], "val": parts["val_fraction"], "test": parts["test_fraction"]
        }  # fmt: skip
    return splits


def _how(prior: Prior, iwae_samples: int) -> str:
    return "exact" if prior.is_exact else f"IWAE bound, K={iwae_samples}"


@torch.no_grad()
def kernel_scores(
    prior: Prior, group: str, kernels: Tensor, *, iwae_samples: int = IWAE_SAMPLES
) -> Tensor:
    """log p(w) of each kernel under ``prior``'s distribution of ``group``, ``(N,)`` float64.

    ``prior`` holds kernel groups (:class:`~dwp.priors.groups.KernelGroups`); its site
    prior's ``kernel_log_prob`` gives the scores: exact for closed-form priors, the
    importance-weighted lower bound with ``iwae_samples`` samples for implicit ones.
    """
    if not isinstance(prior, KernelGroups):
        raise TypeError(f"{type(prior).__name__} is not a prior over kernel groups")
    site = prior.for_group(group)
    options = {} if site.is_exact else {"iwae_samples": iwae_samples}
    parts = [site.kernel_log_prob(chunk, **options) for chunk in kernels.split(_CHUNK)]
    return torch.cat(parts).double().cpu()


def _summary(values: Tensor) -> dict[str, float]:
    """Mean and standard error of the mean (nats per kernel)."""
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": values.mean().item(), "se": se}


def _entry(values: Mapping[str, Tensor], reference: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kernels": len(next(iter(values.values()))),
        "scores": {name: _summary(v) for name, v in values.items()},
    }
    if reference is not None:
        entry["differences"] = {
            name: _summary(v - values[reference]) for name, v in values.items() if name != reference
        }
    return entry


def held_out_scores(
    priors: Mapping[str, Prior],
    test_kernels_by_group: Mapping[str, Tensor],
    *,
    reference: str | None = None,
    iwae_samples: int = IWAE_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Every prior scored on the same held-out kernels, per group and over all groups.

    Parameters
    ----------
    priors
        Display name -> kernel prior (templates holding every group scored).
    test_kernels_by_group
        Group -> kernels ``(N_g, *kernel_shape)`` used for no choice in any fit.
    reference
        The name of the prior the others are compared with (paired differences).
    iwae_samples
        K of the importance-weighted bound of implicit priors.
    seed
        Seeds the bound's draws (the global random state is left as it was).

    Returns
    -------
    dict
        Plain values (a prior's ``metadata`` can keep it): ``unit``, ``how`` (name ->
        ``"exact"`` or the bound used), ``reference``, ``groups`` (group -> ``kernels``,
        ``scores`` name -> ``mean`` / ``se`` in nats per kernel, ``differences`` name ->
        paired ``mean`` / ``se`` against the reference) and ``overall`` (the same over
        all test kernels).
    """
    if reference is not None and reference not in priors:
        raise ValueError(f"reference {reference!r} is not one of the priors {list(priors)}")
    per_group: dict[str, dict[str, Tensor]] = {}
    # the bound's draws come from the kernels' device: fork its random state too when it
    # is a GPU (DeepWeightPrior.fit(device=...)), so that state is left as it was
    cuda = sorted({k.device.index for k in test_kernels_by_group.values() if k.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for group, kernels in test_kernels_by_group.items():
            per_group[group] = {
                name: kernel_scores(prior, group, kernels, iwae_samples=iwae_samples)
                for name, prior in priors.items()
            }
    overall = {name: torch.cat([v[name] for v in per_group.values()]) for name in priors}
    return {
        "unit": "nats per kernel",
        "how": {name: _how(prior, iwae_samples) for name, prior in priors.items()},
        "reference": reference,
        "groups": {group: _entry(values, reference) for group, values in per_group.items()},
        "overall": _entry(overall, reference),
    }


def _cell(summary: Mapping[str, float]) -> str:
    return f"{summary['mean']:.3f} ± {summary['se']:.3f}"


def render_scores(scores: Mapping[str, Any]) -> str:
    """Markdown table of :func:`held_out_scores`: a row per group and one over all groups;
    each cell the mean ± standard error in nats per kernel (units and estimators in the
    header)."""
    names, reference = list(scores["how"]), scores["reference"]
    others = [n for n in names if n != reference] if reference is not None else []
    header = [
        "group",
        "test kernels",
        *(f"{n}, {scores['how'][n]} (nats/kernel)" for n in names),
        *(f"{n} − {reference} (nats/kernel, paired)" for n in others),
    ]
    rows = [*scores["groups"].items()]
    if len(rows) > 1:
        rows.append(("all groups", scores["overall"]))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, entry in rows:
        cells = [group, f"{entry['kernels']:,}", *(_cell(entry["scores"][n]) for n in names)]
        cells += [_cell(entry["differences"][n]) for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_report(
    priors: Mapping[str, Prior],
    test_kernels_by_group: Mapping[str, Tensor],
    *,
    reference: str | None = None,
    iwae_samples: int = IWAE_SAMPLES,
    seed: int = 0,
) -> str:
    """Markdown table comparing ``priors`` on held-out kernels, in nats per kernel.

    :func:`held_out_scores` rendered by :func:`render_scores`; see them for the arguments.
    The test kernels must have been used for no choice in fitting any of the priors
    (:meth:`dwp.DeepWeightPrior.fit` keeps such a split).
    """
    scores = held_out_scores(
        priors, test_kernels_by_group, reference=reference, iwae_samples=iwae_samples, seed=seed
    )
    return render_scores(scores)
