"""Export a case for 3D Slicer: heatmaps (.nii.gz), segmentation (.seg.nrrd), colour table and an .mrml scene.

Folder written by :func:`export_slicer_scene`::

    <out_dir>/
        image_<name>.nii.gz          copy of the reference image (background volume)
        heatmap_<name>.nii.gz        one float32 map per heatmap (names never contain "seg"/"label", which Slicer
                                     would pre-tick as label maps)
        medcam_heat.ctbl             256-entry colour table (Slicer reads no colour map from NIfTI/NRRD)
        segmentation.seg.nrrd        named, coloured segments readable by slicerio; overlapping regions (BraTS
                                     TC/WT/ET) are separate layers (4D "list domain domain domain")
        scene.mrml                   opens the image as background, the first heatmap as a coloured 50 %
                                     foreground overlay in all slice views, and the segmentation as outlines

Open in Slicer: File > Open Data... (or drag the file onto the window) > choose ``scene.mrml`` > OK. Other heatmaps
are selectable as foreground in the slice-view controller (pin icon > foreground volume) or the Volumes module.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import matplotlib
import nrrd
import numpy as np

from medcam.data.loading import MedcamDataError, read_header, strip_image_suffix
from medcam.io.atomic import atomic_write, check_output_path, write_text_atomic
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
BRATS_REGION_SEGMENTS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("TC", (1.0, 0.2, 0.2)),
    ("WT", (0.2, 0.8, 0.2)),
    ("ET", (1.0, 1.0, 0.2)),
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


def write_seg_nrrd(
    segmentation: np.ndarray,
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
    seg = np.asarray(segmentation.detach().cpu().numpy() if hasattr(segmentation, "detach") else segmentation)
    directions, origin = _lps_geometry(affine)
    segments = []  # (name, color, label value, layer)
    if seg.ndim == 3:
        if not np.array_equal(seg, np.round(seg)) or (seg.size and seg.min() < 0):
            raise MedcamDataError("A label-map segmentation must hold non-negative integers.")
        data = seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.uint16)
        values = [int(v) for v in np.unique(data) if v != 0]
        names = dict(segment_names or {})
        colors = dict(segment_colors or {})
        for v in values:
            default = BRATS_LABEL_SEGMENTS.get(v, (f"Segment_{v}", tuple(matplotlib.colormaps["tab10"](v % 10)[:3])))
            segments.append((names.get(v, default[0]), tuple(colors.get(v, default[1])), v, 0))
        kinds = ["domain", "domain", "domain"]
        space_dirs = directions
    elif seg.ndim == 4:
        k = seg.shape[0]
        data = (seg > 0.5).astype(np.uint8)
        if segment_names is None:
            if k != 3:
                raise MedcamDataError(
                    f"Give segment_names for a {k}-channel segmentation (defaults exist for 3: TC, WT, ET)."
                )
            segment_names = [n for n, _ in BRATS_REGION_SEGMENTS]
        if segment_colors is None:
            segment_colors = (
                [c for _, c in BRATS_REGION_SEGMENTS]
                if k == 3
                else [tuple(matplotlib.colormaps["tab10"](i % 10)[:3]) for i in range(k)]
            )
        if len(segment_names) != k or len(segment_colors) != k:
            raise MedcamDataError(f"segment_names/segment_colors need {k} entries for a [{k}, X, Y, Z] segmentation.")
        for i in range(k):
            segments.append((str(segment_names[i]), tuple(segment_colors[i]), 1, i))
        kinds = ["list", "domain", "domain", "domain"]
        space_dirs = np.vstack([np.full(3, np.nan), directions])
    else:
        raise MedcamDataError(f"Segmentation must be [X, Y, Z] labels or [K, X, Y, Z] masks, got shape {seg.shape}.")
    header = {
        "type": "unsigned char" if data.dtype == np.uint8 else "unsigned short",
        "dimension": data.ndim,
        "space": "left-posterior-superior",
        "kinds": kinds,
        "space directions": space_dirs,
        "space origin": origin,
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    spatial = data.shape[-3:]
    for idx, (name, color, value, layer) in enumerate(segments):
        layer_data = data[layer] if data.ndim == 4 else data
        where = np.argwhere(layer_data == value)
        if where.size:
            ext = " ".join(f"{a} {b}" for a, b in zip(where.min(0), where.max(0)))
        else:
            ext = " ".join(f"0 {n - 1}" for n in spatial)
        header.update(
            {
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
        )
    with atomic_write(out_path, overwrite=overwrite) as tmp:
        nrrd.write(str(tmp), data, header, index_order="F")
    logger.info("wrote segmentation %s (%s)", out_path, ", ".join(s[0] for s in segments))
    return out_path


def write_color_table(out_path: PathLike, cmap: str = "inferno", *, overwrite: bool = False) -> Path:
    """Write a 256-entry Slicer colour table file (``index name R G B A``, 0-255) from a matplotlib colour map.

    Entry 0 is fully transparent so that zero-valued voxels do not tint the background."""
    cm = matplotlib.colormaps[cmap]
    lines = [f"# Color table file {Path(out_path).name}", "# 256 values"]
    for i in range(256):
        r, g, b, _ = (np.array(cm(i / 255.0)) * 255).round().astype(int)
        lines.append(f"{i} {cmap}_{i} {r} {g} {b} {0 if i == 0 else 255}")
    return write_text_atomic(out_path, "\n".join(lines) + "\n", overwrite=overwrite)


def _volume_xml(
    idx: int, name: str, fname: str, color_id: str, window: float, level: float, lower_thr: float | None = None
) -> str:
    thr = (
        f' applyThreshold="1" lowerThreshold={quoteattr(f"{lower_thr:.6g}")} upperThreshold="1e+30"'
        if lower_thr is not None
        else ' applyThreshold="0"'
    )
    return (
        f'  <VolumeArchetypeStorage id="vtkMRMLVolumeArchetypeStorageNode{idx}" name="VolumeArchetypeStorage{idx}" '
        f'fileName={quoteattr(fname)} useCompression="1" centerImage="0" UseOrientationFromFile="1"></VolumeArchetypeStorage>\n'
        f'  <VolumeDisplay id="vtkMRMLScalarVolumeDisplayNode{idx}" name="VolumeDisplay{idx}" visibility="true" '
        f'colorNodeID={quoteattr(color_id)} references={quoteattr("colorNodeID:" + color_id + ";")} autoWindowLevel="0" window={quoteattr(f"{window:.6g}")} '
        f'level={quoteattr(f"{level:.6g}")} interpolate="1"{thr}></VolumeDisplay>\n'
        f'  <Volume id="vtkMRMLScalarVolumeNode{idx}" name={quoteattr(name)} '
        f'displayNodeRef="vtkMRMLScalarVolumeDisplayNode{idx}" '
        f'references="display:vtkMRMLScalarVolumeDisplayNode{idx};storage:vtkMRMLVolumeArchetypeStorageNode{idx};" '
        f'storageNodeRef="vtkMRMLVolumeArchetypeStorageNode{idx}" labelMap="0"></Volume>\n'
    )


def export_slicer_scene(
    out_dir: PathLike,
    *,
    image_path: PathLike,
    heatmaps: Mapping[str, np.ndarray],
    segmentation: np.ndarray | None = None,
    segment_names: Mapping[int, str] | Sequence[str] | None = None,
    segment_colors: Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | None = None,
    method: str = "",
    layer: str = "",
    cmap: str = "inferno",
    opacity: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """Write a 3D Slicer folder for one case (see the module docstring for the layout and how to open it).

    Args:
        out_dir: the case folder to create/fill.
        image_path: original image file (NIfTI/NRRD/MHA); copied into the folder as background volume.
        heatmaps: name (e.g. target "WT") -> float array [X, Y, Z] on the ORIGINAL grid of ``image_path``.
        segmentation: label map [X, Y, Z] (e.g. BraTS 1/2/4) or region masks [K, X, Y, Z] (e.g. TC, WT, ET) on
            the same grid, or None.
        segment_names, segment_colors: see :func:`write_seg_nrrd`.
        method, layer: recorded in each heatmap's NIfTI description (target = the heatmap's name).
        cmap: matplotlib colour map for the heatmap colour table.
        opacity: foreground (heatmap) opacity in the slice views, 0..1.
        overwrite: replace existing files.

    Returns:
        Path of ``scene.mrml``.

    Raises:
        OutputExistsError: an output exists and not ``overwrite`` (checked before writing anything);
        MedcamDataError: unreadable image, DICOM folder as image, shapes that disagree, no heatmaps.
    """
    out_dir = Path(out_dir)
    hdr = read_header(image_path)
    if Path(image_path).is_dir():
        raise MedcamDataError(f"'{image_path}' is a DICOM folder; convert it to NIfTI/NRRD for the Slicer scene.")
    if not heatmaps:
        raise MedcamDataError("export_slicer_scene needs at least one heatmap.")
    hm_arrays = {}
    for name, hm in heatmaps.items():
        arr = np.asarray(hm.detach().cpu().numpy() if hasattr(hm, "detach") else hm, dtype=np.float32)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != hdr.shape:
            raise MedcamDataError(
                f"Heatmap {name!r} has shape {arr.shape}, image '{image_path}' has {hdr.shape}; "
                "map it to the original grid first (case.invert)."
            )
        hm_arrays[name] = arr
    if segmentation is not None:
        seg = np.asarray(segmentation.detach().cpu().numpy() if hasattr(segmentation, "detach") else segmentation)
        if seg.shape[-3:] != hdr.shape:
            raise MedcamDataError(f"Segmentation has shape {seg.shape}, image '{image_path}' has {hdr.shape}.")
    src = Path(image_path)
    img_name = "image_" + safe_volume_name(strip_image_suffix(src.name))
    img_file = img_name + src.name[len(strip_image_suffix(src.name)) :]
    hm_files = {}
    for name in hm_arrays:
        fname = f"heatmap_{safe_volume_name(name)}.nii.gz"
        if fname in hm_files.values():
            raise MedcamDataError(f"Two heatmap names map to the same file name {fname!r}; use distinct names.")
        hm_files[name] = fname
    files = [out_dir / img_file, out_dir / "medcam_heat.ctbl", out_dir / "scene.mrml"]
    files += [out_dir / f for f in hm_files.values()]
    if segmentation is not None:
        files.append(out_dir / "segmentation.seg.nrrd")
    for f in files:
        check_output_path(f, overwrite)

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / img_file, overwrite=overwrite) as tmp:
        shutil.copyfile(src, tmp)
    for name, arr in hm_arrays.items():
        save_heatmap(
            arr,
            src,
            out_dir / hm_files[name],
            method=method or "unknown",
            target=name,
            layer=layer or "unknown",
            overwrite=overwrite,
        )
    write_color_table(out_dir / "medcam_heat.ctbl", cmap, overwrite=overwrite)
    if segmentation is not None:
        write_seg_nrrd(
            seg,
            hdr.affine,
            out_dir / "segmentation.seg.nrrd",
            segment_names=segment_names,
            segment_colors=segment_colors,
            overwrite=overwrite,
        )

    # ---- scene
    from medcam.data.loading import read_volume

    img = read_volume(src).numpy()
    nz = img[img != 0]
    lo, hi = np.percentile(nz, [1, 99]) if nz.size else (0.0, 1.0)
    nodes = [_volume_xml(1, img_name, img_file, "vtkMRMLColorTableNodeGrey", float(hi - lo) or 1.0, float(hi + lo) / 2)]
    for i, (name, arr) in enumerate(hm_arrays.items(), start=2):
        amin, amax = float(arr.min()), float(arr.max())
        win = (amax - amin) or 1.0
        nodes.append(
            _volume_xml(
                i,
                f"heatmap {name}",
                hm_files[name],
                "vtkMRMLColorTableNodeMedcamHeat",
                win,
                (amax + amin) / 2,
                lower_thr=amin + 1e-3 * win,
            )
        )
    nodes.append(
        '  <ColorTableStorage id="vtkMRMLColorTableStorageNode1" name="ColorTableStorage1" '
        'fileName="medcam_heat.ctbl"></ColorTableStorage>\n'
        f'  <ColorTable id="vtkMRMLColorTableNodeMedcamHeat" name={quoteattr("medcam_" + cmap)} '
        'storageNodeRef="vtkMRMLColorTableStorageNode1" references="storage:vtkMRMLColorTableStorageNode1;" '
        'type="13"></ColorTable>\n'
    )
    if segmentation is not None:
        nodes.append(
            '  <SegmentationStorage id="vtkMRMLSegmentationStorageNode1" name="SegmentationStorage1" '
            'fileName="segmentation.seg.nrrd" useCompression="1"></SegmentationStorage>\n'
            '  <SegmentationDisplay id="vtkMRMLSegmentationDisplayNode1" name="SegmentationDisplay1" visibility="true" '
            'visibility2DFill="false" visibility2DOutline="true" opacity2DOutline="1" opacity3D="0.5" '
            'preferredDisplayRepresentationName2D="Binary labelmap"></SegmentationDisplay>\n'
            '  <Segmentation id="vtkMRMLSegmentationNode1" name="segmentation" '
            'displayNodeRef="vtkMRMLSegmentationDisplayNode1" storageNodeRef="vtkMRMLSegmentationStorageNode1" '
            'references="display:vtkMRMLSegmentationDisplayNode1;storage:vtkMRMLSegmentationStorageNode1;'
            'referenceImageGeometryRef:vtkMRMLScalarVolumeNode1;"></Segmentation>\n'
        )
    for view in ("Red", "Yellow", "Green"):
        nodes.append(
            f'  <SliceComposite id="vtkMRMLSliceCompositeNode{view}" name="SliceComposite" singletonTag="{view}" '
            f'layoutName="{view}" backgroundVolumeID="vtkMRMLScalarVolumeNode1" '
            f'foregroundVolumeID="vtkMRMLScalarVolumeNode2" foregroundOpacity="{float(opacity):.3g}" '
            'references="backgroundVolume:vtkMRMLScalarVolumeNode1;foregroundVolume:vtkMRMLScalarVolumeNode2;" '
            'labelVolumeID="" labelOpacity="1" compositing="0" linkedControl="1" doPropagateVolumeSelection="0">'
            "</SliceComposite>\n"
        )
    nodes.insert(
        0,
        '  <Selection id="vtkMRMLSelectionNodeSingleton" name="Selection" singletonTag="Singleton" '
        'activeVolumeID="vtkMRMLScalarVolumeNode1" secondaryVolumeID="vtkMRMLScalarVolumeNode2">'
        "</Selection>\n",
    )
    scene = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<MRML version="Slicer4.4.0" userTags="">\n'
        + "".join(nodes)
        + "</MRML>\n"
    )
    scene_path = write_text_atomic(out_dir / "scene.mrml", scene, overwrite=overwrite)
    logger.info("wrote Slicer scene %s", scene_path)
    return scene_path
