"""MR-like contrasts from tissue probabilities, with scanner artefacts.

``image = bias * blur(sum_k p_k mu_k)`` plus Rician noise, where ``p_k`` are the warped
tissue / lesion probabilities and ``mu_k`` the contrast's intensity of tissue ``k``
(jittered a few percent per subject, as between scanners).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from cohorts.deform import smooth_noise

__all__ = ["CONTRASTS", "render"]

_T1 = {"csf": 0.12, "gm": 0.50, "wm": 0.85, "lesion": 0.30}

#: Relative tissue intensities per contrast. FLAIR suppresses CSF and shows lesions bright;
#: T2 shows CSF brightest and a tumour's oedema and necrotic core bright; T1 has WM > GM > CSF.
#: ``t1_tumour`` is T1 with a hypointense tumour: a dark necrotic core, a rim close to grey
#: matter and oedema between grey and white matter.  It is its own key, not more entries of
#: ``t1``: :func:`render` draws one gain per entry, so adding entries to ``t1`` would change
#: the images of the cohorts already rendered in it.
CONTRASTS: dict[str, dict[str, float]] = {
    "flair": {"csf": 0.06, "gm": 0.55, "wm": 0.40, "lesion": 0.95},
    "t2": {"csf": 1.00, "gm": 0.52, "wm": 0.34, "core": 0.90, "rim": 0.60, "oedema": 0.75},
    "t1": _T1,
    "t1_tumour": {
        **{k: _T1[k] for k in ("csf", "gm", "wm")},
        "core": 0.20,
        "rim": 0.55,
        "oedema": 0.62,
    },
}


def render(
    rng: np.random.Generator,
    probabilities: Mapping[str, np.ndarray],
    contrast: str,
    resolution: float,
    *,
    jitter: float = 0.05,
    bias_sd: float = 0.12,
    blur_voxels: tuple[float, float] = (0.3, 0.7),
    noise: tuple[float, float] = (0.01, 0.03),
) -> np.ndarray:
    """Render one image.

    Parameters
    ----------
    rng : numpy.random.Generator
        Consumed identically for every call with the same grid shape.
    probabilities : mapping of str to numpy.ndarray
        Tissue name (a key of ``CONTRASTS[contrast]``) to probability map (X, Y, Z).
    contrast : str
        A key of :data:`CONTRASTS`.
    resolution : float
        Voxel size in mm (sets the bias field's smoothness in voxels).
    jitter : float
        Relative per-subject spread of tissue intensities.
    bias_sd : float
        Standard deviation of the log bias field.
    blur_voxels : (float, float)
        Range of the Gaussian blur's sigma, in voxels.
    noise : (float, float)
        Range of the noise standard deviation, relative to an intensity scale of 1.

    Returns
    -------
    numpy.ndarray
        ``float32`` image, non-negative.
    """
    intensities = CONTRASTS[contrast]
    shape = next(iter(probabilities.values())).shape
    # Draw every random number up front and in a fixed order.
    gains = 1.0 + rng.uniform(-jitter, jitter, size=len(intensities))
    log_bias = smooth_noise(rng, shape, resolution, 60.0, bias_sd)[0]
    sigma = rng.uniform(*blur_voxels)
    sd = rng.uniform(*noise)
    real = rng.standard_normal(shape, dtype=np.float32)
    imag = rng.standard_normal(shape, dtype=np.float32)

    image = np.zeros(shape, dtype=np.float32)
    for (name, mu), gain in zip(intensities.items(), gains, strict=True):
        if name in probabilities:
            image += np.float32(mu * gain) * probabilities[name]
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="constant")
    image *= np.exp(log_bias)
    # Magnitude of complex Gaussian noise: Rician, as in magnitude MR images.
    sd = np.float32(sd)
    return np.sqrt((image + sd * real) ** 2 + (sd * imag) ** 2).astype(np.float32)
