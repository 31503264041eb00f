"""Noise-model importance maps on a toy predictor whose relevant voxels are known."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from regression3d import (
    ImportanceConfig,
    NoiseModel,
    add_noise,
    fit_noise_model,
    importance_auc,
    importance_maps,
    save_nifti,
)

SHAPE = (32, 16, 16)


class RegionMean(nn.Module):
    """A fixed 'predictor': the mean intensity of one 4^3 cube (the only relevant voxels)."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(SHAPE)
        mask[12:16, 8:12, 6:10] = 1
        self.register_buffer("mask", mask)
        self.scale = nn.Parameter(torch.ones(()))  # must stay frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x[:, 0] * self.mask).sum((1, 2, 3)).unsqueeze(1) / self.mask.sum()


def test_noise_is_scaled_between_min_and_max() -> None:
    x = torch.zeros(1, 1, 8, 8, 8)
    g = torch.Generator().manual_seed(0)
    zero = add_noise(x, torch.zeros(1, 1, 8, 8, 8), 0.0, 2.0, g)
    assert torch.equal(zero, x)
    full = add_noise(torch.zeros(1, 1, 40, 40, 40), torch.ones(1, 1, 40, 40, 40), 0.0, 2.0, g)
    assert float(full.std()) == pytest.approx(2.0, rel=0.02)


def test_noise_model_finds_the_relevant_region(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, *SHAPE)
    predictor = RegionMean()
    config = ImportanceConfig(steps=60, batch_size=4, lr=1e-2, lam=0.05, target_scale=0.125)
    model, history = fit_noise_model(predictor, x, config=config)
    assert isinstance(model, NoiseModel)
    assert predictor.scale.item() == 1.0 and predictor.scale.requires_grad  # untouched
    maps = importance_maps(model, x[:2])
    assert maps.shape == (2, *SHAPE)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    relevant = predictor.mask.bool().numpy()
    population = maps.mean(0).numpy()
    # measured ~0.99; a map blind to the region would score 0.5
    assert importance_auc(population, relevant) > 0.9
    assert history[-1]["loss"] < history[0]["loss"]

    path = save_nifti(population, tmp_path / "importance.nii.gz", np.diag([4.0, 4.0, 4.0, 1.0]))
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, np.diag([4.0, 4.0, 4.0, 1.0]))
    np.testing.assert_allclose(np.asarray(img.dataobj), population, rtol=1e-6)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        fit_noise_model(RegionMean(), torch.full((1, 1, *SHAPE), float("nan")))
    with pytest.raises(ValueError, match="min_std"):
        fit_noise_model(
            RegionMean(), torch.zeros(1, 1, *SHAPE), config=ImportanceConfig(min_std=2.0)
        )
    with pytest.raises(ValueError, match="differ in shape"):
        importance_auc(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
