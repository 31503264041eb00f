"""Brain ageing on the template: ventricle enlargement and cortical thinning.

Both effects move tissue into CSF by an amount that grows monotonically with age:

* ventricles grow outward by ``ventricle_growth_mm(age)`` (a distance front around the
  template's ventricles);
* the cortex thins from the pial surface by ``cortical_thinning_mm(age)`` (GM within that
  depth of the brain's outside becomes CSF).

Sex acts as a subtler, global factor: a slightly larger brain for males (applied by the
deformation, see :data:`MALE_SCALE`).
"""

from __future__ import annotations

import numpy as np

from cohorts.anatomy import Anatomy
from cohorts.lesions import ramp

__all__ = [
    "AGE_RANGE",
    "MALE_SCALE",
    "age_tissues",
    "ageing_map",
    "cortical_thinning_mm",
    "ventricle_growth_mm",
]

#: Ages the cohort spans (years).
AGE_RANGE: tuple[float, float] = (18.0, 90.0)
#: Linear size of a male brain relative to a female one (about 10% in volume).
MALE_SCALE: float = 1.03
_MAX_GROWTH_MM = 6.0
_MAX_THINNING_MM = 2.0


def _fraction(age: float) -> float:
    lo, hi = AGE_RANGE
    return float(np.clip((age - lo) / (hi - lo), 0.0, 1.0))


def ventricle_growth_mm(age: float) -> float:
    """Outward growth of the ventricles; accelerates with age, as in cross-sectional data."""
    return _MAX_GROWTH_MM * _fraction(age) ** 1.5


def cortical_thinning_mm(age: float) -> float:
    """Loss of cortex from the pial surface; linear in age."""
    return _MAX_THINNING_MM * _fraction(age)


def age_tissues(anatomy: Anatomy, age: float) -> dict[str, np.ndarray]:
    """Tissue probabilities of the template aged to ``age`` years.

    Returns
    -------
    dict
        ``csf``, ``gm``, ``wm`` (``float32``); their sum equals the template's.
    """
    res = anatomy.resolution
    # 1 inside the grown ventricles (the template's ventricles included), 0 beyond.
    ventricles = ramp(ventricle_growth_mm(age) + 0.5 * res - anatomy.ventricle_distance, res)
    # Depth is ``res`` on the outermost brain voxels; thinning eats into it from there.
    thinned = ramp(cortical_thinning_mm(age) + 0.5 * res - anatomy.depth, res)
    thinned = thinned * (anatomy.mask > 0)
    keep = 1.0 - ventricles
    gm = anatomy.gm * keep * (1.0 - thinned)
    wm = anatomy.wm * keep
    csf = anatomy.csf + (anatomy.gm - gm) + (anatomy.wm - wm)
    return {"csf": csf.astype(np.float32), "gm": gm.astype(np.float32), "wm": wm.astype(np.float32)}


def ageing_map(anatomy: Anatomy) -> np.ndarray:
    """Where ageing acts in the template: 1 ventricles and their growth zone, 2 cortical ribbon.

    Returns
    -------
    numpy.ndarray
        ``uint8`` map; 0 elsewhere.
    """
    res = anatomy.resolution
    reach = ventricle_growth_mm(AGE_RANGE[1]) + res
    out = np.zeros(anatomy.shape, dtype=np.uint8)
    ribbon = (anatomy.gm > 0.1) & (anatomy.depth > 0) & (anatomy.depth <= _MAX_THINNING_MM + res)
    out[ribbon] = 2
    out[(anatomy.ventricle_distance <= reach) & (anatomy.mask > 0)] = 1
    return out
