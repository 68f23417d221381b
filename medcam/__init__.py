"""medcam: class activation maps for 3D medical-image segmentation networks."""

__version__ = "0.1.0"

import logging as _logging

from . import targets
from .engine import BaseSegCAM
from .errors import LayerError, MedcamDataError, MedcamError, ModelError, PhantomError, TargetError
from .layers import LayerInfo, list_layers
from .methods import METHODS, SegGradCAM, SegGradCAMPlusPlus, SegHiResGradCAM, SegLayerCAM, SegXGradCAM
from .normalize import normalize
from .result import CAMResult, interpolate_upsampler
from .runner import ModelRunner
from .tokens import TokenGrid

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# data loading and I/O pull in nibabel/SimpleITK/ITK: imported on first use, so `import medcam` stays light
_LAZY = {
    "load_brats_case": "medcam.data",
    "load_volumes": "medcam.data",
    "BratsCase": "medcam.data",
    "save_heatmap": "medcam.io",
    "export_slicer_scene": "medcam.io",
    "save_overlay_png": "medcam.io",
    "evaluate": "medcam.evaluation",
    "evaluate_cohort": "medcam.evaluation",
    "write_results": "medcam.evaluation",
    "metrics": None,
    "amecam": None,
    "AMECAM": "medcam.amecam",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = _LAZY[name]
        if module is None:  # a subpackage
            return importlib.import_module(f"medcam.{name}")
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'medcam' has no attribute {name!r}")


__all__ = [
    "targets",
    "BaseSegCAM",
    "CAMResult",
    "SegGradCAM",
    "SegHiResGradCAM",
    "SegXGradCAM",
    "SegGradCAMPlusPlus",
    "SegLayerCAM",
    "METHODS",
    "list_layers",
    "LayerInfo",
    "normalize",
    "interpolate_upsampler",
    "ModelRunner",
    "MedcamError",
    "LayerError",
    "TargetError",
    "ModelError",
    "MedcamDataError",
    "PhantomError",
    "TokenGrid",
    *_LAZY,
]
