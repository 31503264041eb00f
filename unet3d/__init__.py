"""unet3d: the 3D U-Net segmentation application built on :mod:`dwp`.

Modules (import the ones you need; ``losses`` and ``metrics`` import MONAI):

* :mod:`unet3d.model`: ``UNet3D``, the MRI paper's network (appendix B), ``kernel3_layers``.
* :mod:`unet3d.cases`: which files make up a data set (Decathlon folder, CSV, any folder
  paired by file name patterns, NIfTI files to predict); :mod:`unet3d.patterns`: the
  patterns (``{id}``, glob).
* :mod:`unet3d.preprocess`: one case read, checked, normalised and cropped / padded;
  :mod:`unet3d.spatial`: full-resolution geometry (orientation, foreground crop, spacing)
  and the one resampling back onto the file's grid.
* :mod:`unet3d.data`: ``SegmentationDataset`` (cached, augmented) and ``collate``; the data
  API (it also exports the case lists, ``uncrop`` and ``save_nifti``).
* :mod:`unet3d.losses`: the paper's loss (MONAI ``DiceCELoss``) and the summed ELBO data term.
* :mod:`unet3d.metrics`: per-volume Dice, IoU and HD95 (MONAI).
* :mod:`unet3d.strategies`, :mod:`unet3d.config`, :mod:`unet3d.train`: the five transfer
  strategies, the run's options and the one training loop (paper recipe, restarts, exact
  resume, DDP).
* :mod:`unet3d.checkpoint`: the checkpoint format (``best.pt``, ``last.pt``,
  ``source_restart{k}.pt``): writing, reading, version check, ``load_model``.
* :mod:`unet3d.inference`: sliding-window Monte Carlo prediction to NIfTI maps.
* :mod:`unet3d.cli`: the command line, ``unet3d train | predict`` (``python -m unet3d``).
"""

from .model import UNet3D, count_kernels, kernel3_layers

__all__ = ["UNet3D", "count_kernels", "kernel3_layers"]
