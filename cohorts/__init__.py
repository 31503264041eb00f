"""Offline synthetic MRI cohorts on the MNI ICBM152 anatomy shipped with nilearn.

Five cohorts, written in the Medical Segmentation Decathlon layout (segmentation) or as a
CSV table (regression), so that the loaders for users' own NIfTI data read them unchanged:

* ``ms_source``: FLAIR-like, 5-20 small periventricular / deep white-matter lesions;
* ``tumour_target``: T2-like, one tumour with core, enhancing rim and oedema;
* ``tumour_t1``: the same tumours in a T1-like contrast, where they are dark (far transfer);
* ``brain_age``: T1-like, age 18-90 enlarges the ventricles and thins the cortex;
* ``lesion_count``: FLAIR-like, 0-12 small lesions; targets are their count and volume.

They need the ``cohorts`` extra (``pip install "dwp[cohorts]"``: nilearn, SciPy); the names
below are imported on first use, so ``import cohorts`` works without it.

>>> import cohorts
>>> path = cohorts.generate("ms_source", "data/ms", n_train=20, resolution=2, seed=0)
>>> one = cohorts.subject("tumour_target", index=0, resolution=4)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dwp.extras import from_extra

if TYPE_CHECKING:
    from cohorts.anatomy import RESOLUTIONS, load_anatomy
    from cohorts.subjects import COHORTS, subject
    from cohorts.writer import CITATION, generate

__all__ = ["CITATION", "COHORTS", "RESOLUTIONS", "generate", "load_anatomy", "subject"]

#: Exported name -> the submodule defining it.  Imported on first use (PEP 562): the
#: submodules import SciPy, which the core install leaves out, and importing this package
#: must stay cheap for the ``dwp-cohorts`` front (:mod:`cohorts.entry`) to answer without it.
_EXPORTS = {
    "RESOLUTIONS": "cohorts.anatomy",
    "load_anatomy": "cohorts.anatomy",
    "COHORTS": "cohorts.subjects",
    "subject": "cohorts.subjects",
    "CITATION": "cohorts.writer",
    "generate": "cohorts.writer",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with from_extra("cohorts", needed_by="cohorts"):
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
