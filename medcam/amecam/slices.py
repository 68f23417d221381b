"""2D slice datasets from 3D volumes (AME-CAM setting) and per-slice segmentation metrics.

Slices follow the AME-CAM protocol: axial 2D slices of one MRI modality, per-volume min-max intensity normalisation,
slice label 1 ("tumour") when the whole-tumour mask (label > 0) covers more than 1% of the slice area, else 0.

:func:`per_slice_metrics` evaluates thresholded maps per slice with medcam's localisation metrics (explicit empty-set
conventions: Dice of two empty sets = 1; HD95 with one side empty = the slice diagonal).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedcamError
from ..normalize import normalize

__all__ = [
    "SliceSet",
    "minmax_volume",
    "extract_slices",
    "load_modality_and_labels",
    "per_slice_metrics",
    "summarise",
    "hd95_pooled",
    "AUTHORS_EMPTY_HD95",
]

logger = logging.getLogger(__name__)

# modality file stems of the BraTS-format cases (2017-2021 names, then 2023+ names)
_MODALITY_NAMES = {
    "t1": ("t1", "t1n"),
    "t1ce": ("t1ce", "t1c"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f"),
}


@dataclass
class SliceSet:
    """A set of 2D slices.

    Attributes:
        images: float32 ``[N, C, H, W]`` (per-volume, per-channel min-max normalised to [0, 1]).
        labels: int64 ``[N]``: 1 tumour (WT covers > threshold of the slice), 0 normal.
        masks: bool ``[N, H, W]`` whole-tumour masks (for evaluation only; never used for training).
        volume_index: int64 ``[N]`` index of the source volume; slice_index: int64 ``[N]`` index along the axis.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    volume_index: torch.Tensor
    slice_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, keep: torch.Tensor | np.ndarray | Sequence[int]) -> SliceSet:
        """Slices selected by a boolean mask or index list."""
        k = torch.as_tensor(keep)
        return SliceSet(self.images[k], self.labels[k], self.masks[k], self.volume_index[k], self.slice_index[k])

    @staticmethod
    def concat(sets: Sequence[SliceSet]) -> SliceSet:
        """Concatenate slice sets (volume indices are kept as given)."""
        if not sets:
            raise MedcamError("nothing to concatenate")
        return SliceSet(
            *(
                torch.cat([getattr(s, f) for s in sets])
                for f in ("images", "labels", "masks", "volume_index", "slice_index")
            )
        )

    def resized(self, size: int | tuple[int, int], pad_square: bool = True) -> SliceSet:
        """Copy resized to ``size`` (images bilinear with antialiasing, masks by nearest neighbour).

        With ``pad_square`` non-square slices are first zero-padded (centred) to a square, keeping the aspect ratio.
        """
        hw: tuple[int, ...] = (size, size) if isinstance(size, int) else tuple(size)
        img, msk = self.images, self.masks
        h, w = img.shape[-2:]
        if pad_square and h != w:
            n = max(h, w)
            pads = ((n - w) // 2, n - w - (n - w) // 2, (n - h) // 2, n - h - (n - h) // 2)
            img, msk = F.pad(img, pads), F.pad(msk, pads)
        if tuple(img.shape[-2:]) != hw:
            img = F.interpolate(img, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
            msk = F.interpolate(msk[:, None].float(), size=hw, mode="nearest")[:, 0] > 0.5
        return SliceSet(img, self.labels, msk, self.volume_index, self.slice_index)


def minmax_volume(volume: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Min-max normalise a whole volume (one modality, any shape) to [0, 1] as float32 (a constant one: zeros)."""
    v = torch.as_tensor(np.asarray(volume, dtype=np.float32) if isinstance(volume, np.ndarray) else volume).float()
    out = normalize(v.reshape(1, 1, -1), "minmax", 0.0, check_finite=True).reshape(v.shape)
    if v.numel() and not bool(out.any()):  # a varying volume reaches 1 at its maximum
        logger.warning("constant volume: normalised to zeros")
    return out


def extract_slices(
    volume: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    axis: int = -1,
    tumour_fraction: float = 0.01,
    min_brain_fraction: float = 0.0,
    volume_index: int = 0,
) -> SliceSet:
    """Slices of one volume along ``axis`` (axial = last axis in BraTS ``[240, 240, 155]``).

    Args:
        volume: one modality ``[X, Y, Z]`` or several ``[C, X, Y, Z]`` (raw intensities; each channel min-max
            normalised here over the whole volume). ``axis`` counts in the spatial dims.
        label: segmentation ``[X, Y, Z]``; whole tumour = label > 0 (works for BraTS 2017-21 and 2023+ labels).
        axis: slicing axis.
        tumour_fraction: a slice is "tumour" when the WT mask covers MORE than this fraction of its pixels.
        min_brain_fraction: drop slices whose non-background (intensity > volume minimum in any channel) fraction is
            at most this (0 keeps every slice that contains any brain; use -1 to keep all slices).
        volume_index: stored with each slice.
    Returns:
        a :class:`SliceSet` with ``C`` image channels.
    """
    vol = torch.as_tensor(np.asarray(volume)) if not isinstance(volume, torch.Tensor) else volume
    lab = torch.as_tensor(np.asarray(label)) if not isinstance(label, torch.Tensor) else label
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4 or tuple(vol.shape[1:]) != tuple(lab.shape):
        raise MedcamError(
            "volume must be [X, Y, Z] or [C, X, Y, Z] and label [X, Y, Z] on the same grid, got "
            f"{tuple(np.shape(volume))} and {tuple(lab.shape)}"
        )
    if not 0 <= tumour_fraction < 1:
        raise MedcamError(f"tumour_fraction must be in [0, 1), got {tumour_fraction}")
    ax = axis % 3
    brain = torch.stack([c > c.min() for c in vol]).any(0).movedim(ax, 0)
    v = torch.stack([minmax_volume(c) for c in vol]).movedim(ax + 1, 1)  # [C, n, H, W]
    wt = (lab > 0).movedim(ax, 0)
    area = v.shape[2] * v.shape[3]
    frac = wt.flatten(1).sum(1).float() / area
    keep = brain.flatten(1).float().mean(1) > min_brain_fraction
    idx = torch.nonzero(keep).flatten()
    if len(idx) == 0:
        raise MedcamError("no slice contains brain: check the volume")
    return SliceSet(
        images=v[:, idx].movedim(0, 1).contiguous(),
        labels=(frac[idx] > tumour_fraction).long(),
        masks=wt[idx].contiguous(),
        volume_index=torch.full((len(idx),), int(volume_index), dtype=torch.long),
        slice_index=idx.long(),
    )


def load_modality_and_labels(
    folder: str | os.PathLike, modality: str | Sequence[str] = "flair", label_file: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one modality (``[X, Y, Z]``) or several (a list: ``[C, X, Y, Z]``) and the reference labels of a
    BraTS-format case folder.

    Accepts 2017-2021 names (``flair.nii.gz``, ``*_flair.nii.gz``) and 2023 names (``t2f``); the label file is
    ``label_file`` if given, else ``seg_fused_simple.nii.gz``, else the single ``*seg*.nii.gz`` in the folder.

    Returns:
        ``(volume float32 [X, Y, Z], label int [X, Y, Z])``.
    """
    import nibabel as nib

    folder = Path(folder)
    if not isinstance(modality, str):
        loaded = [load_modality_and_labels(folder, m, label_file) for m in modality]
        if not loaded:
            raise MedcamError("no modality asked for")
        return np.stack([v for v, _ in loaded]), loaded[0][1]
    if modality not in _MODALITY_NAMES:
        raise MedcamError(f"modality must be one of {sorted(_MODALITY_NAMES)}, got {modality!r}")
    files = sorted(p for p in folder.glob("*.nii*"))
    img_file = None
    for stem in _MODALITY_NAMES[modality]:
        for p in files:
            name = p.name.split(".nii")[0].lower()
            if name == stem or name.endswith(f"_{stem}") or name.endswith(f"-{stem}"):
                img_file = p
                break
        if img_file:
            break
    if img_file is None:
        raise MedcamError(f"no {modality} image in {folder} (looked for {_MODALITY_NAMES[modality]})")
    if label_file is not None:
        seg_file = folder / label_file
    elif (folder / "seg_fused_simple.nii.gz").exists():
        seg_file = folder / "seg_fused_simple.nii.gz"
    else:
        segs = [p for p in files if "seg" in p.name.lower()]
        if len(segs) != 1:
            raise MedcamError(f"cannot choose a label file in {folder}: {[p.name for p in segs]}; pass label_file")
        seg_file = segs[0]
    img_nii: Any = nib.load(str(img_file))  # a spatial image (FileBasedImage in the stubs has no dataobj)
    seg_nii: Any = nib.load(str(seg_file))
    vol = np.asarray(img_nii.dataobj, dtype=np.float32)
    lab = np.asarray(seg_nii.dataobj).astype(np.int16)
    return vol, lab


# ------------------------------------------------------------------------------------------------------ metrics ---
def per_slice_metrics(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, spacing: float = 1.0
) -> dict[str, np.ndarray]:
    """Dice, IoU and HD95 of every slice (medcam's localisation metrics, 2D), ``[N, H, W]`` masks -> ``[N]`` arrays.

    Conventions: Dice / IoU of two empty masks = 1, one empty = 0; HD95 (ours: larger directed 95th percentile) of two
    empty masks = 0, one empty = the slice diagonal ``sqrt(H^2 + W^2) * spacing`` (339.41 for 240 x 240 at 1 mm);
    ``hd95_pooled``: the authors' medpy convention (:func:`hd95_pooled`).
    """
    from ..metrics.localisation import dice_score, hausdorff95, iou_score

    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    r = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).bool()
    if p.ndim != 3 or p.shape != r.shape:
        raise MedcamError(f"need [N, H, W] masks of equal shape, got {tuple(p.shape)} and {tuple(r.shape)}")
    p, r = p.cpu(), r.cpu()
    pn, rn = p.numpy(), r.numpy()
    return {
        "dice": dice_score(p, r, spatial_dims=2).numpy(),
        "iou": iou_score(p, r, spatial_dims=2).numpy(),
        "hd95": hausdorff95(p, r, spacing=spacing, spatial_dims=2).numpy(),
        "hd95_pooled": np.array([hd95_pooled(a, b, spacing) for a, b in zip(pn, rn)], dtype=np.float64),
    }


#: the authors' HD95 when exactly one of prediction / reference is empty (``compute_HD95`` in their evaluation.py)
AUTHORS_EMPTY_HD95 = 373.12866


def hd95_pooled(
    pred: np.ndarray, ref: np.ndarray, spacing: float | Sequence[float] = 1.0, empty_value: float = AUTHORS_EMPTY_HD95
) -> float:
    """HD95 as the AME-CAM authors compute it (``medpy.metric.hd95``): the 95th percentile of the POOLED surface
    distances of both directions.

    Surfaces are the masks minus their erosion with the face-connected structuring element; distances are Euclidean
    (``scipy.ndimage.distance_transform_edt`` with ``spacing``) from each surface voxel of one mask to the nearest
    surface voxel of the other. Both masks empty: 0; one empty: ``empty_value`` (373.12866 in the authors' code).
    Our :func:`medcam.metrics.localisation.hausdorff95` instead takes the larger of the two directed 95th percentiles.
    """
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise MedcamError(f"masks differ in shape: {p.shape} vs {r.shape}")
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return float(empty_value)
    sp = [float(spacing)] * p.ndim if isinstance(spacing, (int, float, np.number)) else [float(v) for v in spacing]
    st = generate_binary_structure(p.ndim, 1)
    pb = p ^ binary_erosion(p, structure=st, iterations=1)
    rb = r ^ binary_erosion(r, structure=st, iterations=1)
    d_pr = distance_transform_edt(~rb, sampling=sp)[pb]
    d_rp = distance_transform_edt(~pb, sampling=sp)[rb]
    return float(np.percentile(np.hstack((d_pr, d_rp)), 95))


def summarise(metrics: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """``{name: (mean, std)}`` of per-slice metric arrays (population std)."""
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in metrics.items()}
