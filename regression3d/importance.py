"""Voxel-level importance maps by a learned noise model (Bintsi et al. 2021, after U-Noise).

A small network (MONAI's ``BasicUNet``, a sigmoid on its output) gives a per-voxel noise
scale ``B(x)`` in ``[0, 1]``.  Gaussian noise ``eps * (B * (max_std - min_std) + min_std)``
is added to the input of the **frozen** predictor ``f``, and the noise model minimises::

    loss = task_loss(f(x + noise), target) - lam * mean(log B)

It adds as much noise as it can where the prediction does not need the voxels; the
importance is ``1 - B``, per subject and averaged over a population.  :func:`importance_auc`
scores a map against known relevant voxels (in the synthetic brain-age cohort, where ageing
acts) as the area under the ROC curve.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dwp.extras import from_extra

from .metrics import auc

# the noise model is MONAI's U-Net; ``import regression3d`` runs this module
with from_extra("regression", needed_by="regression3d"):
    from monai.networks.nets import BasicUNet

__all__ = [
    "ImportanceConfig",
    "NoiseModel",
    "add_noise",
    "fit_noise_model",
    "importance_auc",
    "importance_maps",
]


class NoiseModel(nn.Module):
    """Per-voxel noise scale ``B`` in ``[0, 1]``: ``(N, C, D, H, W) -> (N, 1, D, H, W)``.

    Parameters
    ----------
    in_channels
        Image channels.
    features
        MONAI ``BasicUNet`` features (six integers); small by default.
    """

    def __init__(
        self, in_channels: int = 1, features: tuple[int, ...] = (4, 4, 8, 8, 16, 4)
    ) -> None:
        super().__init__()
        self.net = BasicUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=1, features=features
        )
        # start at B = sigmoid(2) ~ 0.88: mostly noise, so the task loss has to pull
        # important voxels down rather than the penalty pushing everything up from zero
        with torch.no_grad():
            self.net.final_conv.bias.fill_(2.0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (N, C, D, H, W), got shape {tuple(x.shape)}")
        if max(x.shape[2:]) < 32:
            # the U-Net pools four times; instance norm needs more than one voxel at the bottom
            raise ValueError(
                f"NoiseModel needs at least 32 voxels along one axis, got {tuple(x.shape[2:])}"
            )
        return torch.sigmoid(self.net(x))


def add_noise(
    x: Tensor,
    scale: Tensor,
    min_std: float,
    max_std: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x + eps * (scale * (max_std - min_std) + min_std)``, ``eps ~ N(0, 1)`` per voxel.

    ``scale`` ``(N, 1, *spatial)`` broadcasts over the channels of ``x`` ``(N, C, *spatial)``.
    """
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + eps * (scale * (max_std - min_std) + min_std)


@dataclass(frozen=True)
class ImportanceConfig:
    """Training settings of the noise model.

    Attributes
    ----------
    steps, batch_size, lr
        Adam steps, subjects per step and learning rate.
    lam
        Weight of ``-mean(log B)`` (more noise) against the task loss.
    min_std, max_std
        Noise standard deviation at ``B = 0`` and ``B = 1``, in input units.
    target_scale
        Task loss = ``mean(((f(x + noise) - target) / target_scale) ** 2)``: puts the task
        loss on a unit scale (e.g. the standard deviation of the targets).
    seed
        Seed of the batches and the noise.
    """

    steps: int = 200
    batch_size: int = 4
    lr: float = 3e-3
    lam: float = 0.1
    min_std: float = 0.0
    max_std: float = 1.0
    target_scale: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_noise_model(
    predictor: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor | None = None,
    config: ImportanceConfig = ImportanceConfig(),
    *,
    noise_model: NoiseModel | None = None,
    progress: bool = False,
) -> tuple[NoiseModel, list[dict[str, float]]]:
    """Train a noise model against a frozen predictor.

    Parameters
    ----------
    predictor
        ``(N, C, *spatial) -> (N, K)``; a copy of it is frozen (eval mode, no gradients to
        its parameters), the original is left untouched.
    x
        Training images ``(N, C, D, H, W)``.
    target
        ``(N, K)`` labels; default the predictor's own clean predictions (keep the
        prediction rather than fit the label).
    config
        :class:`ImportanceConfig`.
    noise_model
        Start from this model (default a fresh :class:`NoiseModel`).

    Returns
    -------
    tuple
        The trained noise model (eval mode) and the history (``step``, ``loss``, ``task``,
        ``mean_scale``) every 10 steps.
    """
    if x.dim() != 5:
        raise ValueError(f"x must be (N, C, D, H, W), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x holds NaN or inf values")
    if config.max_std < config.min_std or config.min_std < 0:
        raise ValueError(f"need 0 <= min_std <= max_std, got {config.min_std}, {config.max_std}")
    if isinstance(predictor, nn.Module):
        predictor = copy.deepcopy(predictor).eval().requires_grad_(False)
    if target is None:
        with torch.no_grad():
            target = torch.cat([predictor(x[i : i + 1]) for i in range(len(x))])
    target = target.reshape(len(x), -1).to(x.dtype)
    generator = torch.Generator(device=x.device).manual_seed(config.seed)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = NoiseModel(x.shape[1]) if noise_model is None else noise_model
    model = model.to(x.device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    batch = min(config.batch_size, len(x))
    for step in tqdm(range(config.steps), desc="noise model", disable=not progress):
        idx = torch.randperm(len(x), generator=generator, device=x.device)[:batch]
        xb = x[idx]
        scale = model(xb)
        out = predictor(add_noise(xb, scale, config.min_std, config.max_std, generator))
        task = F.mse_loss(
            out.reshape(batch, -1) / config.target_scale, target[idx] / config.target_scale
        )
        # clamp: log(0) would be -inf once a voxel is judged fully important
        penalty = -scale.clamp_min(1e-6).log().mean()
        loss = task + config.lam * penalty
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 10 == 0 or step == config.steps - 1:
            history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "task": task.item(),
                    "mean_scale": scale.mean().item(),
                }
            )
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"noise-model loss is {loss.item()} at step {step}")
    return model.eval(), history


@torch.no_grad()
def importance_maps(noise_model: NoiseModel, x: Tensor) -> Tensor:
    """Importance ``1 - B`` per subject: ``(N, C, D, H, W) -> (N, D, H, W)`` in ``[0, 1]``."""
    noise_model.eval()
    return torch.cat([1.0 - noise_model(x[i : i + 1])[:, 0] for i in range(len(x))])


def importance_auc(importance: object, relevant: object, within: object | None = None) -> float:
    """AUC of an importance map against a binary map of relevant voxels.

    Parameters
    ----------
    importance
        ``(D, H, W)`` scores.
    relevant
        ``(D, H, W)`` bool / 0-1: the voxels that truly matter.
    within
        Optional ``(D, H, W)`` mask of the voxels to score (e.g. the brain).
    """
    imp = np.asarray(importance.cpu() if isinstance(importance, Tensor) else importance)
    rel = np.asarray(relevant.cpu() if isinstance(relevant, Tensor) else relevant).astype(bool)
    if imp.shape != rel.shape:
        raise ValueError(f"importance {imp.shape} and relevant {rel.shape} differ in shape")
    keep = np.ones(imp.shape, bool) if within is None else np.asarray(within).astype(bool)
    if keep.shape != imp.shape:
        raise ValueError(f"within {keep.shape} and importance {imp.shape} differ in shape")
    return auc(rel[keep].astype(np.float64), imp[keep])
