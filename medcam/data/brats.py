"""BraTS cases: folder discovery (2017-2021 and 2023+ layouts or an explicit mapping) and TC/WT/ET regions.

Channel order (default, fixed and documented): **T1, T1ce, T2, FLAIR** (canonical names ``t1, t1ce, t2, flair``;
BraTS 2023+ files ``t1n, t1c, t2w, t2f`` are mapped onto them). Pass ``channel_order`` to change it, e.g.
``("t1ce", "t1", "t2", "flair")`` for MONAI's brats_mri_segmentation bundle.

Label conventions:

* ``"brats2021"`` (BraTS 2017-2021): 1 necrotic/non-enhancing core (NCR), 2 oedema (ED), 4 enhancing tumour (ET);
* ``"brats2023"`` (BraTS 2023+): 1 NETC, 2 SNFH (oedema), **3** ET.

Both are converted to the three overlapping regions networks are trained on, channel order **TC, WT, ET**:
TC = NCR + ET, WT = NCR + ED + ET, ET = ET (MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` after mapping 3 -> 4).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from medcam.data.loading import (
    MedcamDataError,
    VolumeCase,
    check_same_grid,
    load_channels,
    loaded_header,
    read_header,
    read_volume,
    strip_image_suffix,
)
from medcam.data.preprocessing import build_preprocessing

# re-exported: BraTS folders are found by their file names alone, without torch (medcam.brats_layout)
from ..brats_layout import (  # noqa: F401
    _EXTS,
    LABEL_CONVENTIONS,
    LAYOUT_SUFFIXES,
    MODALITIES,
    MODALITY_ALIASES,
    REGIONS,
    _normalise_mapping,
    discover_brats_case,
)
from ..types import PathLike

logger = logging.getLogger(__name__)


def modality_of(channel_name: str) -> str | None:
    """The BraTS modality (``t1``, ``t1ce``, ``t2``, ``flair``) a channel name stands for (e.g. a ``dataset.json``
    channel name ``"T1CE"`` or ``"T2-FLAIR"``), or None: letters and digits only, looked up in
    :data:`MODALITY_ALIASES`."""
    m = MODALITY_ALIASES.get(re.sub(r"[^a-z0-9]", "", channel_name.lower()))
    return m if m in MODALITIES else None


@dataclass
class BratsCase(VolumeCase):
    """A preprocessed BraTS case (see :class:`~medcam.data.loading.VolumeCase`).

    Extra attributes:
        layout: "brats2021", "brats2023", "plain" (files named t1.nii.gz, ...) or "mapping".
        label_convention: "brats2021" (ET = 4) or "brats2023" (ET = 3), or None without label.
        ``label`` is [3, X, Y, Z] float32 with channels TC, WT, ET (0/1).
    """

    layout: str = "mapping"
    label_convention: str | None = None


def infer_label_convention(values: Sequence[int]) -> str:
    """Guess the label convention from the label values present: 4 -> "brats2021", 3 -> "brats2023".

    Without 3 or 4 (no enhancing tumour) both give the same regions; "brats2021" is returned.

    Raises:
        MedcamDataError: both 3 and 4 present, or values outside {0, 1, 2, 3, 4}.
    """
    vals = {int(v) for v in values}
    bad = vals - {0, 1, 2, 3, 4}
    if bad:
        raise MedcamDataError(f"Label map holds values {sorted(bad)}; BraTS labels are 0, 1, 2 and 4 (or 3 for 2023+).")
    if 3 in vals and 4 in vals:
        raise MedcamDataError("Label map holds both 3 and 4; BraTS uses 4 (2017-2021) or 3 (2023+) for ET, not both.")
    return "brats2023" if 3 in vals else "brats2021"


def labels_to_regions(label: np.ndarray | torch.Tensor, convention: str = "brats2021") -> np.ndarray:
    """Convert a BraTS label map to the overlapping regions TC, WT, ET.

    Args:
        label: integer label map [X, Y, Z] (or [1, X, Y, Z]).
        convention: "brats2021" (ET = 4) or "brats2023" (ET = 3).

    Returns:
        bool array [3, X, Y, Z]: TC (labels 1 + ET), WT (1 + 2 + ET), ET.

    Raises:
        MedcamDataError: unknown convention or label values outside the convention.
    """
    if convention not in LABEL_CONVENTIONS:
        raise MedcamDataError(f"Unknown label convention {convention!r}; use one of {sorted(LABEL_CONVENTIONS)}.")
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    arr = np.rint(arr).astype(np.int16)
    allowed = {0, *LABEL_CONVENTIONS[convention].values()}
    bad = set(np.unique(arr).tolist()) - allowed
    if bad:
        raise MedcamDataError(
            f"Label values {sorted(bad)} are not valid for the {convention} convention (allowed {sorted(allowed)})."
        )
    if convention == "brats2023":
        arr = np.where(arr == 3, 4, arr)
    return np.asarray(ConvertToMultiChannelBasedOnBratsClasses()(arr)).astype(bool)


def load_brats_case(
    source: PathLike | Mapping[str, PathLike],
    *,
    channel_order: Sequence[str] = MODALITIES,
    orientation: str | None = "RAS",
    spacing: Sequence[float] | None = None,
    normalize: bool = True,
    crop_foreground: bool = False,
    divisible_by: int | None = None,
    load_label: bool = True,
    label_convention: str | None = None,
    case_id: str | None = None,
) -> BratsCase:
    """Load a BraTS case (folder in either layout, or a modality -> file mapping) and preprocess it invertibly.

    Args:
        source: case folder, or mapping with keys t1, t1ce, t2, flair and optional seg (2023 names t1n, t1c, t2w,
            t2f accepted).
        channel_order: order of the image channels (canonical names); default T1, T1ce, T2, FLAIR.
        orientation, spacing, normalize, crop_foreground, divisible_by: see
            :func:`medcam.data.preprocessing.build_preprocessing` (spacing in mm).
        load_label: read the ``seg`` file when present.
        label_convention: "brats2021" or "brats2023"; default from the layout (mapping: inferred from the values).
        case_id: override the case identifier.

    Returns:
        :class:`BratsCase`: ``image`` [4, X, Y, Z] float32, ``label`` [3, X, Y, Z] (TC, WT, ET) or None,
        ``reference_path`` = the T1 file.

    Raises:
        MedcamDataError: before any resampling, for missing modalities (naming the expected file), unreadable files,
            grids that disagree, non-3D, all-zero or non-finite images, invalid labels.
    """
    order = _channel_order(channel_order)
    layout, cid, paths = _case_paths(source, case_id)
    seg_path = paths.get("seg") if load_label else None
    # cheap header checks of ALL files (images and label) before reading any voxel data
    headers = [read_header(paths[m]) for m in order]
    if seg_path is not None:
        check_same_grid(headers + [read_header(seg_path)])
    convention: str | None = None
    label_mt: MetaTensor | None = None
    if seg_path is not None:  # labels are small and cheap to validate: do it before reading the images
        convention, label_mt = _load_regions(seg_path, layout, label_convention)
    image, loaded = load_channels([paths[m] for m in order])
    data = {"image": image}
    if seg_path is not None and label_mt is not None:
        check_same_grid([loaded[0], loaded_header(seg_path, label_mt)])
        data["label"] = label_mt
    transform = build_preprocessing(
        keys=tuple(data),
        orientation=orientation,
        spacing=spacing,
        normalize=normalize,
        crop_foreground=crop_foreground,
        divisible_by=divisible_by,
    )
    out = transform(data)
    ref_idx = order.index("t1")
    return BratsCase(
        image=out["image"],
        label=out.get("label"),
        paths=dict(paths),
        reference_path=paths["t1"],
        case_id=str(case_id or cid),
        channel_names=order,
        transform=transform,
        original_shape=loaded[ref_idx].shape,
        original_affine=loaded[ref_idx].affine,
        layout=layout,
        label_convention=convention,
    )


def _case_paths(
    source: PathLike | Mapping[str, PathLike], case_id: str | None
) -> tuple[str, str | None, dict[str, Path]]:
    """(layout, case id, canonical modality -> file) of a case folder or an explicit mapping, every modality present."""
    cid: str | None
    if isinstance(source, Mapping):
        paths = _normalise_mapping(source)
        layout, cid = "mapping", case_id
    else:
        layout, cid, paths = discover_brats_case(source)
    for m in MODALITIES:
        if m not in paths:
            raise MedcamDataError(f"Missing modality {m!r} in the mapping; give a path for each of {MODALITIES}.")
    if layout == "mapping" and cid is None:
        cid = strip_image_suffix(paths["t1"].name)
    return layout, cid, paths


def _channel_order(channel_order: Sequence[str]) -> tuple[str, ...]:
    """Canonical names of ``channel_order`` (aliases such as t1c accepted), which must permute the four modalities."""
    order = tuple(MODALITY_ALIASES.get(str(m).lower(), str(m)) for m in channel_order)
    if sorted(order) != sorted(MODALITIES):
        raise MedcamDataError(f"channel_order must be a permutation of {MODALITIES}, got {tuple(channel_order)}.")
    return order


def _load_regions(seg_path: Path, layout: str, label_convention: str | None) -> tuple[str, MetaTensor]:
    """The label file as TC/WT/ET regions ``[3, X, Y, Z]`` float32 on the label's grid, and the convention used
    (given, the layout's, or inferred from the label values)."""
    seg = read_volume(seg_path, is_label=True)
    values = [int(v) for v in np.unique(seg.cpu().numpy())]
    try:
        convention = label_convention or (layout if layout in LABEL_CONVENTIONS else infer_label_convention(values))
        regions = labels_to_regions(seg, convention)
    except MedcamDataError as exc:
        raise MedcamDataError(f"Label file '{seg_path}': {exc}") from exc
    label_mt = MetaTensor(
        torch.from_numpy(regions.astype(np.float32)),
        affine=seg.affine.clone(),
        meta={k: v for k, v in dict(seg.meta).items() if k != "affine"} | {"filename_or_obj": str(seg_path)},
    )
    return convention, label_mt
