"""Invertible preprocessing built from MONAI dictionary transforms.

Pipeline (in this order, each step optional except the first):

1. ``EnsureChannelFirstd`` (inputs are already [C, X, Y, Z]; kept so raw MONAI dicts work too),
2. ``Orientationd`` to ``orientation`` axis codes (default "RAS"),
3. ``Spacingd`` to ``spacing`` mm (bilinear for images, nearest for labels),
4. ``CropForegroundd`` to the bounding box of non-zero image voxels,
5. ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` on the image only,
6. ``DivisiblePadd`` so every spatial size is a multiple of ``divisible_by``.

Spatial steps are MONAI ``InvertibleTransform``s and record themselves in each MetaTensor's ``applied_operations``,
so ``monai.transforms.Invertd`` (see :meth:`medcam.data.loading.VolumeCase.invert`) maps any volume in preprocessed
space back to the original grid. All transforms use ``allow_missing_keys=True`` so the same pipeline inverts a
single key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
)

from ..errors import MedcamDataError

logger = logging.getLogger(__name__)

#: axis-code letters for MONAI's RAS-world affines (explicit, so MONAI's changing default does not matter)
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def nonzero_foreground(x: torch.Tensor) -> torch.Tensor:
    """Foreground selector for ``CropForegroundd``: any non-zero voxel (intensities may be negative)."""
    return x != 0


def build_preprocessing(
    keys: Sequence[str] = ("image", "label"),
    *,
    image_key: str = "image",
    orientation: str | None = "RAS",
    spacing: Sequence[float] | None = None,
    normalize: bool = True,
    crop_foreground: bool = False,
    crop_margin: int = 0,
    divisible_by: int | None = None,
) -> Compose:
    """Build the MONAI ``Compose`` of dict transforms used by the loaders.

    Args:
        keys: dict keys to transform spatially; keys other than ``image_key`` are treated as label maps
            (nearest-neighbour resampling, no intensity normalisation).
        image_key: the key holding the image [C, X, Y, Z].
        orientation: axis codes such as "RAS" or "LPS", or None to keep the stored orientation.
        spacing: target voxel size (mm) along the (reoriented) array axes, one float or three; None keeps it.
        normalize: z-score normalisation of each channel over its non-zero voxels.
        crop_foreground: crop to the bounding box of non-zero voxels of the image (+ ``crop_margin`` voxels).
        divisible_by: pad (zeros, centred) so spatial sizes are multiples of this; None for no padding.

    Returns:
        ``monai.transforms.Compose``; call it on ``{"image": MetaTensor[C,X,Y,Z], "label": ...}``.
    """
    keys = tuple(keys)
    if image_key not in keys:
        raise MedcamDataError(f"image_key {image_key!r} must be one of keys {keys}")
    modes: tuple[str, ...] = tuple("bilinear" if k == image_key else "nearest" for k in keys)
    steps: list[MapTransform] = [EnsureChannelFirstd(keys=keys, channel_dim=0, allow_missing_keys=True)]
    if orientation is not None:
        steps.append(Orientationd(keys=keys, axcodes=orientation, labels=_RAS_LABELS, allow_missing_keys=True))
    if spacing is not None:
        pix = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(float(s) for s in spacing)
        if len(pix) != 3 or min(pix) <= 0:
            raise MedcamDataError(f"spacing must be a positive number or 3 positive numbers (mm), got {spacing!r}")
        steps.append(Spacingd(keys=keys, pixdim=pix, mode=modes, padding_mode="zeros", allow_missing_keys=True))
    if crop_foreground:
        steps.append(
            CropForegroundd(
                keys=keys,
                source_key=image_key,
                select_fn=nonzero_foreground,
                margin=crop_margin,
                allow_smaller=True,
                allow_missing_keys=True,
            )
        )
    if normalize:
        steps.append(NormalizeIntensityd(keys=image_key, nonzero=True, channel_wise=True))
    if divisible_by is not None:
        if int(divisible_by) < 1:
            raise MedcamDataError(f"divisible_by must be a positive integer, got {divisible_by!r}")
        steps.append(DivisiblePadd(keys=keys, k=int(divisible_by), allow_missing_keys=True))
    logger.debug("preprocessing: %s", [type(s).__name__ for s in steps])
    return Compose(steps)
