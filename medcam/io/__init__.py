"""Output: heatmaps as NIfTI on the original grid, 3D Slicer scenes, PNG overlays, atomic writes."""

from medcam.io.atomic import OutputExistsError, atomic_write, check_output_path, write_bytes_atomic, write_text_atomic
from medcam.io.nifti import ReferenceGeometry, reference_geometry, save_heatmap, save_label_map
from medcam.io.overlays import RasVolume, overlay_figure, plane, roi_centre, save_overlay_png
from medcam.io.slicer import export_slicer_scene, safe_volume_name, write_color_table, write_seg_nrrd

__all__ = [
    "OutputExistsError",
    "atomic_write",
    "check_output_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "ReferenceGeometry",
    "reference_geometry",
    "save_heatmap",
    "save_label_map",
    "RasVolume",
    "overlay_figure",
    "plane",
    "roi_centre",
    "save_overlay_png",
    "export_slicer_scene",
    "safe_volume_name",
    "write_color_table",
    "write_seg_nrrd",
]
