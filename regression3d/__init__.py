"""Regression on 3D images with the Bayesian layer API: BagNets, Hydranet, importance maps.

* :mod:`~regression3d.bagnet`: :class:`BagNet3D` (receptive field 9 / 17 / 33 / 177,
  local prediction maps, a strictly local variant), :func:`measure_receptive_field`;
* :mod:`~regression3d.regressor`: Hydranet's :class:`BaseRegressor`;
* :mod:`~regression3d.hydranet`: set-sum augmentation for any regressor, all members in
  one forward pass or a few at a time (:func:`set_loss_backward`);
* :mod:`~regression3d.augment`: :class:`RigidAugmentation` (the Hydranet paper's random
  flips, rotation and translation, from MONAI transforms);
* :mod:`~regression3d.train`: :func:`fit` (deterministic, or the ELBO for networks made
  Bayesian by :func:`make_bayesian` with any ``dwp`` prior, a deep weight prior included),
  :class:`FittedModel.predict` (mean and epistemic variance);
* :mod:`~regression3d.metrics`: MAE, RMSE, r, R^2, ICC (Shrout & Fleiss), accuracy, AUC,
  brain-age gap with bias correction;
* :mod:`~regression3d.importance`: noise-model importance maps (Bintsi et al. 2021);
* :mod:`~regression3d.nifti`: local maps and importance maps as NIfTI aligned to the input.

The package knows nothing about the synthetic cohorts: it takes tensors and affines.
"""

from .augment import RigidAugmentation
from .bagnet import KERNEL3, BagNet3D, ChannelNorm3d, bagnet3d, linearised, measure_receptive_field
from .hydranet import SetBatch, draw_sets, set_loss_backward, set_members, set_sum, set_targets
from .importance import (
    ImportanceConfig,
    NoiseModel,
    add_noise,
    fit_noise_model,
    importance_auc,
    importance_maps,
)
from .metrics import (
    AgeBiasCorrection,
    accuracy,
    auc,
    brain_age_report,
    icc,
    icc_agreement,
    mae,
    mse,
    pearson_r,
    r2,
    regression_report,
    rmse,
)
from .nifti import local_map_affine, save_local_map, save_nifti, upsample_to_input
from .regressor import BaseRegressor, SkipBlock
from .train import (
    FittedModel,
    HydraConfig,
    TrainConfig,
    fit,
    kernel3_convs,
    make_bayesian,
    standardise_images,
)

__all__ = [
    "KERNEL3",
    "AgeBiasCorrection",
    "BagNet3D",
    "BaseRegressor",
    "ChannelNorm3d",
    "FittedModel",
    "HydraConfig",
    "ImportanceConfig",
    "NoiseModel",
    "RigidAugmentation",
    "SetBatch",
    "SkipBlock",
    "TrainConfig",
    "accuracy",
    "add_noise",
    "auc",
    "bagnet3d",
    "brain_age_report",
    "draw_sets",
    "fit",
    "fit_noise_model",
    "icc",
    "icc_agreement",
    "importance_auc",
    "importance_maps",
    "kernel3_convs",
    "linearised",
    "local_map_affine",
    "mae",
    "make_bayesian",
    "measure_receptive_field",
    "mse",
    "pearson_r",
    "r2",
    "regression_report",
    "rmse",
    "save_local_map",
    "save_nifti",
    "set_loss_backward",
    "set_members",
    "set_sum",
    "set_targets",
    "standardise_images",
    "upsample_to_input",
]
