"""Export a case for 3D Slicer: heatmaps (.nii.gz), segmentation (.seg.nrrd), colour table and an .mrml scene.

Folder written by :func:`export_slicer_scene`::

    <out_dir>/
        image_<name>.nii.gz          copies of the images: the background (T1ce or the first channel when the
                                     pipeline writes it) and every other modality (grey volumes, selectable
                                     as background in the slice-view controller)
        heatmap_<name>.nii.gz        one float32 map per heatmap given as an array (names never contain
                                     "seg"/"label", which Slicer would pre-tick as label maps); a heatmap given
                                     as a file is referenced by a relative path instead (``medcam explain``:
                                     ``../heatmaps/*.nii.gz``, so every map is stored once and the case folder
                                     stays self-contained and zippable)
        medcam_heat.ctbl             256-entry colour table with the display spec's colour map and opacity ramp
                                     (Slicer reads no colour map from NIfTI/NRRD)
        segmentation.seg.nrrd        named, coloured segments readable by slicerio; overlapping regions (BraTS
                                     TC/WT/ET) are separate layers (4D "list domain domain domain")
        scene.mrml                   opens the image as background, the first heatmap as a coloured foreground
                                     overlay in all slice views (window/level = the map's colour scale of the
                                     display spec, as in the PNGs), and the segmentation as outlines

Open in Slicer: File > Open Data... (or drag the file onto the window) > choose ``scene.mrml`` > OK. Other heatmaps
are selectable as foreground in the slice-view controller (pin icon > foreground volume) or the Volumes module.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import matplotlib
import nrrd
import numpy as np
import torch

from medcam.data.loading import ImageHeader, MedcamDataError, read_header, read_volume, strip_image_suffix
from medcam.io.atomic import atomic_write, check_output_path, write_text_atomic
from medcam.io.display import DEFAULT_CMAP, REGION_COLOURS, Ramp, heat_lut, region_colour
from medcam.io.nifti import save_heatmap

from ..types import PathLike

logger = logging.getLogger(__name__)


#: default segment names/colours (RGB 0-1) for BraTS label values and regions
BRATS_LABEL_SEGMENTS: dict[int, tuple[str, tuple[float, float, float]]] = {
    1: ("NCR", (1.0, 0.2, 0.2)),
    2: ("ED", (0.2, 0.8, 0.2)),
    3: ("ET", (1.0, 1.0, 0.2)),
    4: ("ET", (1.0, 1.0, 0.2)),
}
BRATS_REGION_SEGMENTS: tuple[tuple[str, tuple[float, float, float]], ...] = tuple(
    (n, REGION_COLOURS[n]) for n in ("TC", "WT", "ET")
)
_FORBIDDEN = re.compile(r"seg|label", re.IGNORECASE)


def safe_volume_name(name: str) -> str:
    """File-name-safe version of ``name`` without the words "seg"/"label" (Slicer would load such files as label
    maps): "seg-grad-cam WT" -> "sgm-grad-cam_WT"."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "map"
    out = re.sub(r"seg", "sgm", out, flags=re.IGNORECASE)
    out = re.sub(r"label", "lbl", out, flags=re.IGNORECASE)
    return out


def _lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, float)
    return lps[:3, :3].T.copy(), lps[:3, 3].copy()  # rows = direction of each array axis (nrrd convention)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy array of an array or (possibly GPU, grad-tracking) tensor."""
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)


def _tab10(i: int) -> tuple[float, float, float]:
    r, g, b = matplotlib.colormaps["tab10"](i % 10)[:3]
    return float(r), float(g), float(b)


#: one segment of a .seg.nrrd: (name, RGB colour in 0..1, label value, layer)
_Segment = tuple[str, tuple[float, ...], int, int]


@dataclass
class _SegLayout:
    """What a .seg.nrrd holds: the voxel data, its segments and, per array axis, the NRRD kind and direction."""

    data: np.ndarray
    segments: list[_Segment]
    kinds: list[str]
    space_directions: np.ndarray


def _label_map_layout(
    seg: np.ndarray,
    directions: np.ndarray,
    segment_names: Mapping[int, str] | Sequence[str] | None,
    segment_colors: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None,
) -> _SegLayout:
    """An integer label map [X, Y, Z]: one segment per non-zero value, all in layer 0."""
    if not np.array_equal(seg, np.round(seg)) or (seg.size and seg.min() < 0):
        raise MedcamDataError("A label-map segmentation must hold non-negative integers.")
    names = segment_names or {}
    colors = segment_colors or {}
    if not isinstance(names, Mapping) or not isinstance(colors, Mapping):
        raise MedcamDataError("For a label map give segment_names/segment_colors as {label value: entry} mappings.")
    data = seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.uint16)
    segments: list[_Segment] = []
    for v in (int(v) for v in np.unique(data) if v != 0):
        default = BRATS_LABEL_SEGMENTS.get(v, (f"Segment_{v}", _tab10(v)))
        segments.append((names.get(v, default[0]), tuple(colors.get(v, default[1])), v, 0))
    return _SegLayout(data, segments, ["domain", "domain", "domain"], directions)


def _masks_layout(
    seg: np.ndarray,
    directions: np.ndarray,
    segment_names: Mapping[int, str] | Sequence[str] | None,
    segment_colors: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None,
) -> _SegLayout:
    """K binary masks [K, X, Y, Z]: one segment per mask, each in its own layer (so that they may overlap)."""
    k = seg.shape[0]
    if segment_names is None:
        if k != 3:
            raise MedcamDataError(
                f"Give segment_names for a {k}-channel segmentation (defaults exist for 3: TC, WT, ET)."
            )
        segment_names = [n for n, _ in BRATS_REGION_SEGMENTS]
    if segment_colors is None:
        segment_colors = [region_colour(str(n), i) for i, n in enumerate(segment_names)]
    if len(segment_names) != k or len(segment_colors) != k:
        raise MedcamDataError(f"segment_names/segment_colors need {k} entries for a [{k}, X, Y, Z] segmentation.")
    segments: list[_Segment] = [(str(segment_names[i]), tuple(segment_colors[i]), 1, i) for i in range(k)]
    space_dirs = np.vstack([np.full(3, np.nan), directions])
    return _SegLayout((seg > 0.5).astype(np.uint8), segments, ["list", "domain", "domain", "domain"], space_dirs)


def _segment_fields(idx: int, segment: _Segment, layout: _SegLayout) -> dict[str, str]:
    """The ``Segment<idx>_*`` header fields of one segment (its extent = bounding box of its voxels)."""
    name, color, value, layer = segment
    layer_data = layout.data[layer] if layout.data.ndim == 4 else layout.data
    where = np.argwhere(layer_data == value)
    if where.size:
        ext = " ".join(f"{a} {b}" for a, b in zip(where.min(0), where.max(0)))
    else:
        ext = " ".join(f"0 {n - 1}" for n in layout.data.shape[-3:])
    return {
        f"Segment{idx}_ID": f"Segment_{idx + 1}",
        f"Segment{idx}_Name": name,
        f"Segment{idx}_NameAutoGenerated": "0",
        f"Segment{idx}_Color": " ".join(f"{c:.6g}" for c in color),
        f"Segment{idx}_ColorAutoGenerated": "0",
        f"Segment{idx}_LabelValue": str(value),
        f"Segment{idx}_Layer": str(layer),
        f"Segment{idx}_Extent": ext,
        f"Segment{idx}_Tags": "Segmentation.Status:inprogress|",
    }


def _seg_nrrd_header(layout: _SegLayout, origin: np.ndarray) -> dict[str, Any]:
    """The NRRD header of a Slicer segmentation: geometry (LPS), representation and every segment's fields."""
    header: dict[str, Any] = {
        "type": "unsigned char" if layout.data.dtype == np.uint8 else "unsigned short",
        "dimension": layout.data.ndim,
        "space": "left-posterior-superior",
        "kinds": layout.kinds,
        "space directions": layout.space_directions,
        "space origin": origin,
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for idx, segment in enumerate(layout.segments):
        header.update(_segment_fields(idx, segment, layout))
    return header


def write_seg_nrrd(
    segmentation: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    out_path: PathLike,
    *,
    segment_names: Mapping[int, str] | Sequence[str] | None = None,
    segment_colors: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Slicer segmentation file (``.seg.nrrd``) with named, coloured segments.

    Args:
        segmentation: either an integer label map [X, Y, Z] (one segment per non-zero value, single layer), or
            K binary masks [K, X, Y, Z] (one segment per mask, each in its own layer so they may overlap, e.g. TC,
            WT, ET).
        affine: 4x4 voxel -> RAS (mm) of the grid (written as LPS, like Slicer).
        segment_names: label value -> name (label maps; default BraTS NCR/ED/ET for 1, 2, 3/4, else "Segment_<v>"),
            or a list of K names (masks; default TC, WT, ET when K == 3).
        segment_colors: same keys/order as the names, RGB in 0..1.
        overwrite: replace an existing file.

    Returns:
        The written path.
    """
    out_path = check_output_path(out_path, overwrite)
    seg = _as_numpy(segmentation)
    directions, origin = _lps_geometry(affine)
    if seg.ndim == 3:
        layout = _label_map_layout(seg, directions, segment_names, segment_colors)
    elif seg.ndim == 4:
        layout = _masks_layout(seg, directions, segment_names, segment_colors)
    else:
        raise MedcamDataError(f"Segmentation must be [X, Y, Z] labels or [K, X, Y, Z] masks, got shape {seg.shape}.")
    header = _seg_nrrd_header(layout, origin)
    with atomic_write(out_path, overwrite=overwrite) as tmp:
        nrrd.write(str(tmp), layout.data, header, index_order="F")
    logger.info("wrote segmentation %s (%s)", out_path, ", ".join(s[0] for s in layout.segments))
    return out_path


def write_color_table(
    out_path: PathLike, cmap: str = DEFAULT_CMAP, *, overwrite: bool = False, ramp: Ramp | None = None
) -> Path:
    """Write a 256-entry Slicer colour table file (``index name R G B A``, 0-255): the display spec's heatmap colour
    map with its threshold/opacity ramp in the alpha column (:func:`medcam.io.display.heat_lut`), so the slice
    views fade the map in exactly as the PNGs do (entry 0 is fully transparent)."""
    lut = np.rint(heat_lut(cmap, ramp) * 255).astype(int)
    lines = [f"# Color table file {Path(out_path).name}", "# 256 values"]
    for i, (r, g, b, a) in enumerate(lut):
        lines.append(f"{i} {cmap}_{i} {r} {g} {b} {a}")
    return write_text_atomic(out_path, "\n".join(lines) + "\n", overwrite=overwrite)


def _volume_xml(
    idx: int, name: str, fname: str, color_id: str, window: float, level: float, lower_thr: float | None = None
) -> str:
    """Storage, display and volume nodes of one scalar volume. The display attributes are spelled as
    ``vtkMRMLScalarVolumeDisplayNode::ReadXMLAttributes`` reads them (Slicer/Slicer,
    Libs/MRML/Core/vtkMRMLScalarVolumeDisplayNode.cxx: window, level, upperThreshold, lowerThreshold, interpolate,
    autoWindowLevel, applyThreshold, autoThreshold; integers for the flags) and ``colorNodeID``/``visibility`` as
    vtkMRMLDisplayNode reads them."""
    thr = (
        f' applyThreshold="1" autoThreshold="0" lowerThreshold={quoteattr(f"{lower_thr:.6g}")} upperThreshold="1e+30"'
        if lower_thr is not None
        else ' applyThreshold="0"'
    )
    return (
        f'  <VolumeArchetypeStorage id="vtkMRMLVolumeArchetypeStorageNode{idx}" name="VolumeArchetypeStorage{idx}" '
        f'fileName={quoteattr(fname)} useCompression="1" centerImage="0" UseOrientationFromFile="1">'
        "</VolumeArchetypeStorage>\n"
        f'  <VolumeDisplay id="vtkMRMLScalarVolumeDisplayNode{idx}" name="VolumeDisplay{idx}" visibility="true" '
        f"colorNodeID={quoteattr(color_id)} references={quoteattr('colorNodeID:' + color_id + ';')} "
        f'autoWindowLevel="0" window={quoteattr(f"{window:.6g}")} level={quoteattr(f"{level:.6g}")} interpolate="1"'
        f"{thr}></VolumeDisplay>\n"
        f'  <Volume id="vtkMRMLScalarVolumeNode{idx}" name={quoteattr(name)} '
        f'displayNodeRef="vtkMRMLScalarVolumeDisplayNode{idx}" '
        f'references="display:vtkMRMLScalarVolumeDisplayNode{idx};storage:vtkMRMLVolumeArchetypeStorageNode{idx};" '
        f'storageNodeRef="vtkMRMLVolumeArchetypeStorageNode{idx}" labelMap="0"></Volume>\n'
    )


@dataclass
class _SceneMap:
    """One heatmap of the scene: its file name as the scene references it (relative to the scene), whether it is
    written here (an array) or referenced (an existing file, e.g. ``../heatmaps/x.nii.gz``), its data (arrays only)
    and its colour scale (lo, hi)."""

    fname: str
    array: np.ndarray | None
    scale: tuple[float, float]


@dataclass
class _SceneFiles:
    """File names of a Slicer folder: images as (volume name, file name), heatmap name -> :class:`_SceneMap`."""

    image: tuple[str, str]
    others: dict[str, tuple[str, str]]
    heatmaps: dict[str, _SceneMap]
    has_segmentation: bool

    def all(self) -> list[str]:
        """The files this export writes (referenced heatmap files are not written)."""
        files = [self.image[1], "medcam_heat.ctbl", "scene.mrml"]
        files += [f for _, f in self.others.values()]
        files += [m.fname for m in self.heatmaps.values() if m.array is not None]
        return files + (["segmentation.seg.nrrd"] if self.has_segmentation else [])


def _spec_scale(display: Mapping[str, Any] | None, name: str, path: Path | None) -> tuple[float, float] | None:
    """The scale the display spec gives a heatmap: its map entry with the file's stem (``gradcam_WT``), or the one
    whose "method target" or stem is the heatmap's name."""
    if not display:
        return None
    stem = strip_image_suffix(path.name) if path is not None else None
    for m in display.get("maps", []):
        if m.get("stem") in (stem, name) or f"{m.get('method')} {m.get('target')}" == name:
            lo, hi = m["scale"]
            return float(lo), float(hi)
    return None


def _own_scale(arr: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _scene_maps(
    heatmaps: Mapping[str, Any],
    shape: tuple[int, ...],
    image_path: PathLike,
    out_dir: Path,
    display: Mapping[str, Any] | None,
) -> dict[str, _SceneMap]:
    """Each heatmap checked against the image's grid: arrays (float32 [X, Y, Z], a leading singleton channel
    dropped) to be written as ``heatmap_<name>.nii.gz``, files referenced where they are (relative path)."""
    if not heatmaps:
        raise MedcamDataError("export_slicer_scene needs at least one heatmap.")
    out: dict[str, _SceneMap] = {}
    for name, hm in heatmaps.items():
        if isinstance(hm, str | os.PathLike):
            path = Path(hm)
            if read_header(path).shape != shape:
                raise MedcamDataError(f"Heatmap file '{path}' is not on the grid of '{image_path}' ({shape}).")
            scale = _spec_scale(display, name, path) or _own_scale(read_volume(path).numpy())
            rel = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
            out[name] = _SceneMap(rel, None, scale)
            continue
        arr = _as_numpy(hm).astype(np.float32, copy=False)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != shape:
            raise MedcamDataError(
                f"Heatmap {name!r} has shape {arr.shape}, image '{image_path}' has {shape}; "
                "map it to the original grid first (case.invert)."
            )
        fname = f"heatmap_{safe_volume_name(name)}.nii.gz"
        if fname in [m.fname for m in out.values()]:
            raise MedcamDataError(f"Two heatmap names map to the same file name {fname!r}; use distinct names.")
        out[name] = _SceneMap(fname, arr, _spec_scale(display, name, None) or _own_scale(arr))
    return out


def _check_other_images(others: Mapping[str, Path], hdr: ImageHeader, image_path: PathLike) -> None:
    for name, path in others.items():
        h = read_header(path)
        if h.shape != hdr.shape or not np.allclose(h.affine, hdr.affine, atol=1e-3):
            raise MedcamDataError(f"Image {name!r} ('{path}') is not on the grid of '{image_path}'.")


def _image_file(name: str | None, path: Path) -> tuple[str, str]:
    """(volume name, file name) of an image copied into the folder: ``image_<name>`` plus the original suffix."""
    stem = strip_image_suffix(path.name)
    vol_name = "image_" + safe_volume_name(name or stem)
    return vol_name, vol_name + path.name[len(stem) :]


def _scene_files(
    src: Path, image_name: str | None, others: Mapping[str, Path], maps: dict[str, _SceneMap], has_seg: bool
) -> _SceneFiles:
    """The folder's file names, refusing two inputs that would land in the same file."""
    image = _image_file(image_name, src)
    other_files = {name: _image_file(name, path) for name, path in others.items()}
    if len({image[1], *(f for _, f in other_files.values())}) != 1 + len(other_files):
        raise MedcamDataError("Two images map to the same file name in the Slicer folder; use distinct names.")
    return _SceneFiles(image, other_files, maps, has_seg)


def _grey_node(idx: int, name: str, fname: str, path: Path, window: Sequence[float] | None = None) -> str:
    """A grey volume node windowed on ``window`` (the display spec's), else on the 1st-99th percentile of the image's
    non-zero voxels."""
    if window is None:
        img = read_volume(path).numpy()
        nz = img[img != 0]
        window = np.percentile(nz, [1, 99]) if nz.size else (0.0, 1.0)
    lo, hi = float(window[0]), float(window[1])
    return _volume_xml(idx, name, fname, "vtkMRMLColorTableNodeGrey", (hi - lo) or 1.0, (hi + lo) / 2)


def _heatmap_node(idx: int, name: str, m: _SceneMap, ramp: Ramp) -> str:
    """A heatmap volume node: window/level = the map's colour scale, so colour-table entry i is the value
    ``lo + i / 255 * (hi - lo)`` as in the PNGs; values below the ramp's threshold are not drawn."""
    lo, hi = m.scale
    color = "vtkMRMLColorTableNodeMedcamHeat"
    thr = lo + ramp.threshold * (hi - lo)
    return _volume_xml(idx, f"heatmap {name}", m.fname, color, hi - lo, (hi + lo) / 2, lower_thr=thr)


def _color_table_xml(cmap: str) -> str:
    return (
        '  <ColorTableStorage id="vtkMRMLColorTableStorageNode1" name="ColorTableStorage1" '
        'fileName="medcam_heat.ctbl"></ColorTableStorage>\n'
        f'  <ColorTable id="vtkMRMLColorTableNodeMedcamHeat" name={quoteattr("medcam_" + cmap)} '
        'storageNodeRef="vtkMRMLColorTableStorageNode1" references="storage:vtkMRMLColorTableStorageNode1;" '
        'type="13"></ColorTable>\n'
    )


#: Attributes of Slicer's segmentation display node, spelled as ``vtkMRMLSegmentationDisplayNode::ReadXMLAttributes``
#: reads them (Slicer/Slicer, Libs/MRML/Core/vtkMRMLSegmentationDisplayNode.cxx: vtkMRMLReadXMLStringMacro /
#: BooleanMacro / FloatMacro of PreferredDisplayRepresentationName2D, PreferredDisplayRepresentationName3D,
#: Visibility2DFill, Visibility2DOutline, Opacity3D, Opacity2DFill, Opacity2DOutline; names are compared with strcmp,
#: so case matters; a boolean is true only for the exact text "true"), plus ``visibility`` of its superclass
#: vtkMRMLDisplayNode (Libs/MRML/Core/vtkMRMLDisplayNode.cxx). Outlines only: the heatmap stays visible.
SEGMENTATION_DISPLAY_ATTRIBUTES: dict[str, str] = {
    "visibility": "true",
    "PreferredDisplayRepresentationName2D": "Binary labelmap",
    "PreferredDisplayRepresentationName3D": "Closed surface",
    "Visibility2DFill": "false",
    "Visibility2DOutline": "true",
    "Opacity3D": "0.5",
    "Opacity2DFill": "0.5",
    "Opacity2DOutline": "1",
}


def _segmentation_xml(seg_file: str, reference_volume: str) -> str:
    attrs = " ".join(f"{k}={quoteattr(v)}" for k, v in SEGMENTATION_DISPLAY_ATTRIBUTES.items())
    return (
        '  <SegmentationStorage id="vtkMRMLSegmentationStorageNode1" name="SegmentationStorage1" '
        f'fileName={quoteattr(seg_file)} useCompression="1"></SegmentationStorage>\n'
        f'  <SegmentationDisplay id="vtkMRMLSegmentationDisplayNode1" name="SegmentationDisplay1" {attrs}>'
        "</SegmentationDisplay>\n"
        '  <Segmentation id="vtkMRMLSegmentationNode1" name="segmentation" '
        'displayNodeRef="vtkMRMLSegmentationDisplayNode1" storageNodeRef="vtkMRMLSegmentationStorageNode1" '
        'references="display:vtkMRMLSegmentationDisplayNode1;storage:vtkMRMLSegmentationStorageNode1;'
        f'referenceImageGeometryRef:{reference_volume};"></Segmentation>\n'
    )


_SELECTION_XML = (
    '  <Selection id="vtkMRMLSelectionNodeSingleton" name="Selection" singletonTag="Singleton" '
    'activeVolumeID="vtkMRMLScalarVolumeNode1" secondaryVolumeID="vtkMRMLScalarVolumeNode2">'
    "</Selection>\n"
)


def _slice_composite_xml(view: str, opacity: float) -> str:
    """A slice view showing volume 1 (the image) as background and volume 2 (the first heatmap) as foreground."""
    return (
        f'  <SliceComposite id="vtkMRMLSliceCompositeNode{view}" name="SliceComposite" singletonTag="{view}" '
        f'layoutName="{view}" backgroundVolumeID="vtkMRMLScalarVolumeNode1" '
        f'foregroundVolumeID="vtkMRMLScalarVolumeNode2" foregroundOpacity="{float(opacity):.3g}" '
        'references="backgroundVolume:vtkMRMLScalarVolumeNode1;foregroundVolume:vtkMRMLScalarVolumeNode2;" '
        'labelVolumeID="" labelOpacity="1" compositing="0" linkedControl="1" doPropagateVolumeSelection="0">'
        "</SliceComposite>\n"
    )


@dataclass(frozen=True)
class _SceneLook:
    """What the scene takes from the display spec: colour map, ramp, foreground opacity, grey window per channel."""

    cmap: str
    ramp: Ramp
    opacity: float
    windows: Mapping[str, Sequence[float]]


def _scene_xml(files: _SceneFiles, src: Path, others: Mapping[str, Path], look: _SceneLook) -> str:
    """The .mrml text: volume 1 = the image, volumes 2.. = the heatmaps, then the other images."""
    image_window = look.windows.get(files.image[0].removeprefix("image_"))
    nodes = [_SELECTION_XML, _grey_node(1, *files.image, src, image_window)]
    for i, (name, m) in enumerate(files.heatmaps.items(), start=2):
        nodes.append(_heatmap_node(i, name, m, look.ramp))
    first_other = 2 + len(files.heatmaps)
    for i, (name, (vol_name, fname)) in enumerate(files.others.items(), start=first_other):
        nodes.append(_grey_node(i, vol_name, fname, others[name], look.windows.get(name)))
    nodes.append(_color_table_xml(look.cmap))
    if files.has_segmentation:
        nodes.append(_segmentation_xml("segmentation.seg.nrrd", "vtkMRMLScalarVolumeNode1"))
    nodes += [_slice_composite_xml(view, look.opacity) for view in ("Red", "Yellow", "Green")]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<MRML version="Slicer4.4.0" userTags="">\n'
        + "".join(nodes)
        + "</MRML>\n"
    )


def _write_volumes(
    out_dir: Path,
    files: _SceneFiles,
    src: Path,
    others: Mapping[str, Path],
    *,
    method: str,
    layer: str,
    overwrite: bool,
) -> None:
    """Copy the image files into the folder and write every array heatmap as NIfTI on the image's grid."""
    for path, (_, fname) in [(src, files.image)] + [(others[n], vf) for n, vf in files.others.items()]:
        with atomic_write(out_dir / fname, overwrite=overwrite) as tmp:
            shutil.copyfile(path, tmp)
    for name, m in files.heatmaps.items():
        if m.array is None:
            continue
        save_heatmap(
            m.array,
            src,
            out_dir / m.fname,
            method=method or "unknown",
            target=name,
            layer=layer or "unknown",
            overwrite=overwrite,
        )


def _look(display: Mapping[str, Any] | None, cmap: str | None, opacity: float | None) -> _SceneLook:
    """The scene's colour map, ramp, opacity and grey windows: the display spec's, unless given."""
    d = display or {}
    ramp = Ramp(**d["ramp"]) if d.get("ramp") else Ramp()
    windows: dict[str, Sequence[float]] = {}
    for bg in (d.get("backgrounds") or {}).values():
        windows.setdefault(str(bg["channel"]), bg["window"])
    return _SceneLook(
        cmap or d.get("cmap") or DEFAULT_CMAP, ramp, ramp.opacity if opacity is None else float(opacity), windows
    )


def _segment_colours(
    display: Mapping[str, Any] | None,
    names: Mapping[int, str] | Sequence[str] | None,
    colours: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None,
) -> Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None:
    """The segment colours of the display spec for a list of region names (unless colours are given)."""
    if colours is not None or not display or names is None or isinstance(names, Mapping):
        return colours
    by_name = {str(s["name"]): s["color"] for s in display.get("segments") or []}
    return [by_name.get(str(n), region_colour(str(n), i)) for i, n in enumerate(names)]


def export_slicer_scene(
    out_dir: PathLike,
    *,
    image_path: PathLike,
    heatmaps: Mapping[str, np.ndarray | torch.Tensor | PathLike],
    image_name: str | None = None,
    other_images: Mapping[str, PathLike] | None = None,
    segmentation: np.ndarray | torch.Tensor | None = None,
    segment_names: Mapping[int, str] | Sequence[str] | None = None,
    segment_colors: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None = None,
    method: str = "",
    layer: str = "",
    cmap: str | None = None,
    opacity: float | None = None,
    overwrite: bool = False,
    display: Mapping[str, Any] | None = None,
) -> Path:
    """Write a 3D Slicer folder for one case (see the module docstring for the layout and how to open it).

    Args:
        out_dir: the case folder to create/fill.
        image_path: original image file (NIfTI/NRRD/MHA); copied into the folder as background volume.
        image_name: its volume name in the scene (default from the file name).
        other_images: name -> file of further co-registered images (e.g. the other MRI modalities), each copied
            and loaded as a grey volume (selectable as background); they must share the grid of ``image_path``.
        heatmaps: name (e.g. target "WT") -> float array [X, Y, Z] on the ORIGINAL grid of ``image_path`` (written
            into the folder), or the path of a NIfTI map on that grid already written (referenced by a relative
            path, never copied: e.g. the case folder's ``heatmaps/*.nii.gz``).
        segmentation: label map [X, Y, Z] (e.g. BraTS 1/2/4) or region masks [K, X, Y, Z] (e.g. TC, WT, ET) on
            the same grid, or None.
        segment_names, segment_colors: see :func:`write_seg_nrrd` (colours default to the display spec's).
        method, layer: recorded in each written heatmap's NIfTI description (target = the heatmap's name).
        cmap: colour map of the heatmaps (default: the display spec's, else turbo).
        opacity: foreground (heatmap) opacity in the slice views, 0..1 (default: the spec's ramp opacity).
        overwrite: replace existing files.
        display: the case's display spec (``summary.json`` ``figures.display``, :mod:`medcam.io.display`): each
            heatmap's colour scale (matched by file stem or "method target"), ramp, grey windows, segment colours.
            Without it each heatmap is shown on its own range.

    Returns:
        Path of ``scene.mrml``.

    Raises:
        OutputExistsError: an output exists and not ``overwrite`` (checked before writing anything);
        MedcamDataError: unreadable image, DICOM folder as image, shapes that disagree, no heatmaps.
    """
    out_dir, src = Path(out_dir), Path(image_path)
    hdr = read_header(image_path)
    if src.is_dir():
        raise MedcamDataError(f"'{image_path}' is a DICOM folder; convert it to NIfTI/NRRD for the Slicer scene.")
    maps = _scene_maps(heatmaps, hdr.shape, image_path, out_dir, display)
    seg = None if segmentation is None else _as_numpy(segmentation)
    if seg is not None and seg.shape[-3:] != hdr.shape:
        raise MedcamDataError(f"Segmentation has shape {seg.shape}, image '{image_path}' has {hdr.shape}.")
    others = {str(k): Path(v) for k, v in (other_images or {}).items()}
    _check_other_images(others, hdr, image_path)
    files = _scene_files(src, image_name, others, maps, seg is not None)
    for f in files.all():
        check_output_path(out_dir / f, overwrite)
    look = _look(display, cmap, opacity)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_volumes(out_dir, files, src, others, method=method, layer=layer, overwrite=overwrite)
    write_color_table(out_dir / "medcam_heat.ctbl", look.cmap, overwrite=overwrite, ramp=look.ramp)
    if seg is not None:
        write_seg_nrrd(
            seg,
            hdr.affine,
            out_dir / "segmentation.seg.nrrd",
            segment_names=segment_names,
            segment_colors=_segment_colours(display, segment_names, segment_colors),
            overwrite=overwrite,
        )
    scene = _scene_xml(files, src, others, look)
    scene_path = write_text_atomic(out_dir / "scene.mrml", scene, overwrite=overwrite)
    logger.info("wrote Slicer scene %s", scene_path)
    return scene_path
