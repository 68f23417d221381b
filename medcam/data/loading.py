"""Loading and validating volumes with MONAI ``LoadImage``.

Files are checked from their headers first (existence, readability, 3D, matching shapes and affines), then their voxel
data are read with MONAI :class:`~monai.transforms.LoadImage` (nibabel reader for NIfTI, ITK reader for NRRD, MHA/MHD
and DICOM series folders) and checked for NaN/Inf and all-zero content, all before preprocessing (the expensive part).

Affines follow MONAI/nibabel: a 4x4 matrix mapping voxel indices (i, j, k) to RAS world coordinates in mm.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImage

from ..brats_layout import strip_image_suffix  # noqa: F401 - re-exported (it lives where no torch is imported)
from ..errors import MedcamDataError
from ..geometry import spacing_of
from ..types import PathLike
from .dicom_series import check_channel_series, read_dicom_series

logger = logging.getLogger(__name__)


#: tolerance (mm, or unitless for direction cosines) when comparing affines of files that must share a grid
AFFINE_ATOL = 1e-3

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SUPPORTED_HINT = "NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a folder with one DICOM series"


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image read from its header only.

    Attributes:
        path: the file (or DICOM folder).
        shape: voxel grid size (X, Y, Z).
        affine: 4x4 voxel-index -> RAS world (mm) matrix.
    """

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        return spacing_of(self.affine)


def is_nifti(path: PathLike) -> bool:
    """True when ``path`` has a NIfTI file name (.nii or .nii.gz)."""
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def sitk_to_ras_affine(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Build a RAS voxel->world affine (4x4) from ITK/SimpleITK LPS geometry (spacing mm, origin mm, 3x3 direction)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d @ np.diag(np.asarray(spacing, dtype=float))
    aff[:3, 3] = np.asarray(origin, dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff


def ras_affine_to_sitk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Inverse of :func:`sitk_to_ras_affine`: RAS affine -> (spacing, origin, direction) in ITK's LPS convention."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def _dicom_files(folder: Path) -> list[str]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise MedcamDataError(
            f"Folder '{folder}' contains no DICOM series. Give a folder holding the .dcm files of ONE series, "
            f"or a file in a supported format ({_SUPPORTED_HINT})."
        )
    if len(ids) > 1:
        raise MedcamDataError(
            f"Folder '{folder}' contains {len(ids)} DICOM series ({', '.join(ids)}); move each series into its own folder."
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def read_header(path: PathLike) -> ImageHeader:
    """Read the geometry of one image from its header, without reading the voxel data.

    NIfTI headers are read with nibabel (the affine nibabel and MONAI use), everything else with SimpleITK.
    DICOM series folders: the slice files are listed and the geometry comes from reading the series.

    Raises:
        MedcamDataError: missing or unreadable file, or not a 3D image.
    """
    path = Path(path)
    if not path.exists():
        raise MedcamDataError(f"Image file '{path}' does not exist; check the path.")
    try:
        if path.is_dir():
            read_dicom_series(path)  # one regular single-frame series, or a clear error (headers only)
            files = _dicom_files(path)
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            img = sitk.ReadImage(files) if len(files) > 1 else None
            if img is None:
                shape = tuple(reader.GetSize())
                affine = sitk_to_ras_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
            else:
                shape = tuple(img.GetSize())
                affine = sitk_to_ras_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
        elif is_nifti(path):
            nii = load_nifti(path)
            shape = tuple(int(s) for s in nii.shape)
            affine = np.asarray(nii.affine, dtype=float)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
            if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
                shape = shape + ((reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
                affine = np.eye(4)
            else:
                affine = sitk_to_ras_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    except MedcamDataError:
        raise
    except Exception as exc:  # nibabel/ITK raise many different types
        raise MedcamDataError(
            f"Cannot read image file '{path}' ({type(exc).__name__}: {exc}). The file is corrupt or not in a supported "
            f"format ({_SUPPORTED_HINT}); re-export or re-download it."
        ) from exc
    if len(shape) != 3:
        raise MedcamDataError(
            f"Image '{path}' has shape {shape}, but medcam needs a 3D volume (X, Y, Z). "
            "Split 4D/multi-component files into one 3D file per channel and give them as separate INPUTS (Python: a list)."
        )
    if min(shape) < 2:
        raise MedcamDataError(
            f"Image '{path}' has shape {shape}; a 3D volume needs at least 2 voxels along every axis."
        )
    x, y, z = shape
    return ImageHeader(path=path, shape=(x, y, z), affine=affine)


def load_nifti(path: PathLike) -> nib.Nifti1Image:
    """nibabel's image of a NIfTI file (header and lazy voxel data; Nifti2Image is a Nifti1Image).

    Raises:
        MedcamDataError: the file is not a NIfTI-1/2 image.
    """
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):
        raise MedcamDataError(f"'{path}' is read by nibabel as {type(img).__name__}, not NIfTI; check the file.")
    return img


def loaded_header(path: PathLike, volume: MetaTensor) -> ImageHeader:
    """The grid of a volume as read (``[X, Y, Z]`` or ``[C, X, Y, Z]``, MONAI's affine), to compare with other reads."""
    x, y, z = (int(s) for s in volume.shape[-3:])
    return ImageHeader(Path(path), (x, y, z), np.asarray(volume.affine, dtype=float))


def check_same_grid(headers: Sequence[ImageHeader], atol: float = AFFINE_ATOL) -> None:
    """Check that all images share one voxel grid (shape and affine); ``atol`` in mm.

    Raises:
        MedcamDataError: naming the first file whose shape or affine differs from the first image.
    """
    ref = headers[0]
    for h in headers[1:]:
        if h.shape != ref.shape:
            raise MedcamDataError(
                f"Image '{h.path}' has shape {h.shape} but '{ref.path}' has shape {ref.shape}: all channels must share "
                "one voxel grid. Resample/register them onto a common grid first."
            )
        if not np.allclose(h.affine, ref.affine, atol=atol):
            raise MedcamDataError(
                f"Image '{h.path}' has a different affine (voxel->world mapping) from '{ref.path}':\n"
                f"{np.round(h.affine, 4)}\nvs\n{np.round(ref.affine, 4)}\n"
                "All channels must share one voxel grid. Resample/register them onto a common grid first."
            )


def read_volume(path: PathLike, *, is_label: bool = False) -> MetaTensor:
    """Read one 3D volume with MONAI ``LoadImage`` and check its content.

    Args:
        path: image file or DICOM series folder.
        is_label: label maps may be all zero (no lesion) but must hold integer values.

    Returns:
        MetaTensor [X, Y, Z] float32, ``.affine`` RAS voxel->world (mm).

    Raises:
        MedcamDataError: unreadable/truncated data, non-finite values, an all-zero image, non-integer labels.
    """
    path = Path(path)
    try:
        vol = LoadImage(image_only=True, dtype=np.float32)(str(path))
    except Exception as exc:
        raise MedcamDataError(
            f"Cannot read the voxel data of '{path}' ({type(exc).__name__}: {exc}). The file is probably corrupt or "
            "truncated; re-export or re-download it."
        ) from exc
    arr = vol.detach().cpu().numpy() if isinstance(vol, torch.Tensor) else np.asarray(vol)
    if arr.ndim != 3:
        raise MedcamDataError(f"Image '{path}' loaded with shape {tuple(arr.shape)}; medcam needs a 3D volume.")
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise MedcamDataError(
            f"Image '{path}' contains {n_bad} non-finite voxels (NaN or Inf). Fix the file (e.g. replace them with 0)."
        )
    if is_label:
        if not np.array_equal(arr, np.round(arr)):
            raise MedcamDataError(f"Label map '{path}' holds non-integer values; give an integer label map.")
    elif not np.any(arr):
        raise MedcamDataError(f"Image '{path}' is all zeros; check that the right file was given.")
    return vol


def load_channels(paths: Sequence[PathLike]) -> tuple[MetaTensor, list[ImageHeader]]:
    """Validate then read several single-channel files and stack them as channels.

    Header checks for all files run before any voxel data is read.

    Returns:
        (MetaTensor [C, X, Y, Z] float32 whose meta/affine come from the first file, headers of all files).
    """
    if len(paths) == 0:
        raise MedcamDataError("No image files given; pass at least one path.")
    headers = [read_header(p) for p in paths]
    dicom = [read_dicom_series(h.path) for h in headers if h.path.is_dir()]
    check_channel_series(dicom)  # before the grid check: names the orientation as the reason
    check_same_grid(headers)
    vols = [read_volume(h.path) for h in headers]
    # DICOM geometry and reader-specific affines: re-check on what MONAI actually loaded
    loaded = [loaded_header(h.path, v) for h, v in zip(headers, vols)]
    check_same_grid(loaded)
    ref = vols[0]
    stacked = torch.stack([torch.as_tensor(v.as_tensor() if isinstance(v, MetaTensor) else v) for v in vols], 0)
    meta = copy.deepcopy(dict(ref.meta))
    meta["filename_or_obj"] = str(headers[0].path)
    meta.pop("affine", None)
    image = MetaTensor(stacked.float(), affine=ref.affine.clone(), meta=meta)
    image.meta["original_channel_dim"] = 0
    return image, loaded


@dataclass
class VolumeCase:
    """A loaded, preprocessed case.

    Attributes:
        image: MetaTensor [C, X, Y, Z] float32 in preprocessed space (its ``.affine`` maps voxels to RAS mm and its
            ``applied_operations`` record the invertible preprocessing).
        label: MetaTensor [K, X, Y, Z] float32 (0/1 region masks) in preprocessed space, or None.
        paths: channel name -> source file (plus ``"seg"`` for a label file).
        reference_path: the original file whose grid/affine heatmaps are written in (first channel).
        case_id: identifier (folder or file name).
        channel_names: names of the C channels in order.
        transform: the MONAI ``Compose`` of dict transforms that produced ``image`` (used by :meth:`invert`).
        original_shape: (X, Y, Z) voxels of the reference file.
        original_affine: 4x4 RAS affine of the reference file (as loaded by MONAI).
    """

    image: MetaTensor
    label: MetaTensor | None
    paths: dict[str, Path]
    reference_path: Path
    case_id: str
    channel_names: tuple[str, ...]
    transform: Compose
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray = field(repr=False)

    def invert(self, volume: np.ndarray | torch.Tensor, *, nearest: bool = False) -> np.ndarray:
        """Map a volume from preprocessed space back onto the ORIGINAL image grid with MONAI ``Invertd``.

        Args:
            volume: [C, X, Y, Z] or [X, Y, Z] array with the spatial shape of ``self.image`` (e.g. a heatmap).
            nearest: nearest-neighbour interpolation (use for label maps); default linear (for heatmaps).

        Returns:
            numpy float32 [C, *original_shape] (or [*original_shape] for 3D input) on the grid of
            ``reference_path``; voxels outside the preprocessed field of view are 0.
        """
        if isinstance(volume, MetaTensor):
            volume = volume.as_tensor()
        vol = volume.detach().cpu() if isinstance(volume, torch.Tensor) else torch.as_tensor(np.asarray(volume))
        squeeze = vol.ndim == 3
        if squeeze:
            vol = vol[None]
        if vol.ndim != 4 or tuple(vol.shape[1:]) != tuple(self.image.shape[1:]):
            raise MedcamDataError(
                f"invert() needs a volume of spatial shape {tuple(self.image.shape[1:])} (the preprocessed image), "
                f"got shape {tuple(volume.shape)}."
            )
        pred = MetaTensor(vol.float(), affine=self.image.affine.clone())
        inverter = Invertd(keys="pred", transform=self.transform, orig_keys="image", nearest_interp=nearest)
        out = inverter({"image": self.image, "pred": pred})["pred"]
        arr = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        arr = arr.astype(np.float32, copy=False)
        if tuple(arr.shape[1:]) != tuple(self.original_shape):  # pragma: no cover - guards MONAI behaviour changes
            raise RuntimeError(f"inversion produced shape {arr.shape[1:]}, expected {self.original_shape}")
        return arr[0] if squeeze else arr


def load_volumes(
    paths: PathLike | Sequence[PathLike] | Mapping[str, PathLike],
    *,
    orientation: str | None = "RAS",
    spacing: Sequence[float] | None = None,
    normalize: bool = True,
    crop_foreground: bool = False,
    divisible_by: int | None = None,
    case_id: str | None = None,
) -> VolumeCase:
    """Load one or several co-registered 3D volumes as channels and preprocess them invertibly.

    Args:
        paths: a file/DICOM folder, a list of them (channel order = list order), or a mapping name -> path.
        orientation: target axis codes for MONAI ``Orientationd`` (e.g. "RAS"), or None to keep the file's.
        spacing: target voxel size in mm (3 floats) for ``Spacingd`` (linear interpolation), or None to keep it.
        normalize: z-score each channel over its non-zero voxels (``NormalizeIntensityd(nonzero, channel_wise)``).
        crop_foreground: crop to the bounding box of non-zero voxels (``CropForegroundd``).
        divisible_by: pad spatial size up to a multiple of this (``DivisiblePadd``), or None.
        case_id: name of the case; default the first file's name without extension.

    Returns:
        :class:`VolumeCase` with ``image`` [C, X', Y', Z'] and ``label`` None.

    Raises:
        MedcamDataError: see :func:`read_header`, :func:`check_same_grid`, :func:`read_volume`.
    """
    from medcam.data.preprocessing import build_preprocessing

    if isinstance(paths, Mapping):
        names = tuple(str(k) for k in paths)
        files = [Path(p) for p in paths.values()]
    elif isinstance(paths, (str, os.PathLike)):
        files = [Path(paths)]
        names = ("image",)
    else:
        files = [Path(p) for p in paths]
        names = tuple(f"channel{i}" for i in range(len(files)))
    image, headers = load_channels(files)
    transform = build_preprocessing(
        keys=("image",),
        orientation=orientation,
        spacing=spacing,
        normalize=normalize,
        crop_foreground=crop_foreground,
        divisible_by=divisible_by,
    )
    out = transform({"image": image})
    return VolumeCase(
        image=out["image"],
        label=None,
        paths=dict(zip(names, files)),
        reference_path=files[0],
        case_id=case_id or strip_image_suffix(files[0].name),
        channel_names=names,
        transform=transform,
        original_shape=headers[0].shape,
        original_affine=headers[0].affine,
    )
