"""Offline synthetic MRI cohorts on the MNI ICBM152 anatomy shipped with nilearn.

Four cohorts, written in the Medical Segmentation Decathlon layout (segmentation) or as a
CSV table (regression), so that the loaders for users' own NIfTI data read them unchanged:

* ``ms_source``: FLAIR-like, 5-20 small periventricular / deep white-matter lesions;
* ``tumour_target``: T2-like, one tumour with core, enhancing rim and oedema;
* ``brain_age``: T1-like, age 18-90 enlarges the ventricles and thins the cortex;
* ``lesion_count``: FLAIR-like, 0-12 small lesions; targets are their count and volume.

>>> import cohorts
>>> path = cohorts.generate("ms_source", "data/ms", n_train=20, resolution=2, seed=0)
>>> one = cohorts.subject("tumour_target", index=0, resolution=4)
"""

from cohorts.anatomy import RESOLUTIONS, load_anatomy
from cohorts.subjects import COHORTS, subject
from cohorts.writer import CITATION, generate

__all__ = ["CITATION", "COHORTS", "RESOLUTIONS", "generate", "load_anatomy", "subject"]
