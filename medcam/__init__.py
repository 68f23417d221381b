"""medcam: class activation maps for 3D medical-image segmentation networks."""

__version__ = "0.1.0"

import logging as _logging
import sys as _sys
import types as _types

from .errors import LayerError, MedcamDataError, MedcamError, ModelError, PhantomError, TargetError

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# Everything that needs torch (and data loading / I/O, which pull in nibabel/SimpleITK/ITK) is imported on first use:
# `import medcam` and `medcam --help` stay fast (torch alone takes 1.5-2 s to import).
_LAZY = {
    "targets": None,
    "BaseSegCAM": "medcam.engine",
    "CAMResult": "medcam.result",
    "interpolate_upsampler": "medcam.result",
    "ModelRunner": "medcam.runner",
    "LayerInfo": "medcam.layers",
    "list_layers": "medcam.layers",
    "METHODS": "medcam.methods",
    "SegGradCAM": "medcam.methods",
    "SegGradCAMPlusPlus": "medcam.methods",
    "SegHiResGradCAM": "medcam.methods",
    "SegLayerCAM": "medcam.methods",
    "SegXGradCAM": "medcam.methods",
    "normalize": "medcam.normalize",
    "TokenGrid": "medcam.tokens",
    "SegMICAM": "medcam.micam",
    "SegMIGradCAM": "medcam.micam",
    "SynthesizedCAM": "medcam.sycam",
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
    "synthesize": "medcam.synthesis",
    "SynthesisCase": "medcam.synthesis",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = _LAZY[name]
        if module is None:  # a subpackage
            return importlib.import_module(f"medcam.{name}")
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'medcam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """``medcam.normalize`` is the function, although a submodule of that name exists: importing the submodule
    (done lazily now, e.g. by medcam.metrics) must not replace the package attribute with the module."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "normalize" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


__all__ = [
    "MedcamError",
    "LayerError",
    "TargetError",
    "ModelError",
    "MedcamDataError",
    "PhantomError",
    *_LAZY,
]
