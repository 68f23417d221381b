"""medcam: class activation maps for 3D medical-image segmentation networks."""
__version__ = "0.1.0"

import logging as _logging

from . import targets
from .engine import BaseSegCAM, CAMResult, interpolate_upsampler
from .errors import LayerError, MedcamError, ModelError, TargetError
from .layers import LayerInfo, list_layers
from .methods import METHODS, SegGradCAM, SegGradCAMPlusPlus, SegHiResGradCAM, SegLayerCAM, SegXGradCAM
from .normalize import normalize

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

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
    "MedcamError",
    "LayerError",
    "TargetError",
    "ModelError",
]
