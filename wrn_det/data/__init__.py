"""Datasets: classification readers and loaders, the COCO catalog and loaders, synthetic data, proposal files.

Import the submodules directly (``wrn_det.data.classification``, ``wrn_det.data.catalog``, ...).
Importing the package registers the builtin detection datasets (:mod:`wrn_det.data.builtin`).
"""
from . import builtin  # noqa: F401  (registrations)
