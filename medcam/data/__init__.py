"""Input: BraTS cases (2017-2021 / 2023+ layouts or explicit mappings) and generic volumes via MONAI, invertible
preprocessing, and BraTS-like phantoms (``medcam.data.phantoms``, imported lazily)."""

from medcam.data.brats import (
    MODALITIES,
    REGIONS,
    BratsCase,
    discover_brats_case,
    infer_label_convention,
    labels_to_regions,
    load_brats_case,
)
from medcam.data.loading import MedcamDataError, VolumeCase, load_volumes, read_header, read_volume
from medcam.data.preprocessing import build_preprocessing

__all__ = [
    "MODALITIES",
    "REGIONS",
    "BratsCase",
    "VolumeCase",
    "MedcamDataError",
    "discover_brats_case",
    "infer_label_convention",
    "labels_to_regions",
    "load_brats_case",
    "load_volumes",
    "read_header",
    "read_volume",
    "build_preprocessing",
]
