"""Models shipped with medcam: the demo SegResNet for BraTS-like 4-channel MRI (see ``MODEL_CARD.md``)."""

from medcam.models.demo import (
    DEMO_ARCH,
    DEMO_CHANNELS,
    DEMO_LAYER,
    DEMO_REGIONS,
    DEMO_ROI_SIZE,
    DEMO_SPACING_MM,
    DEMO_WEIGHTS,
    demo_network,
    demo_preprocessing_kwargs,
    load_demo_model,
)

__all__ = [
    "DEMO_ARCH",
    "DEMO_CHANNELS",
    "DEMO_LAYER",
    "DEMO_REGIONS",
    "DEMO_ROI_SIZE",
    "DEMO_SPACING_MM",
    "DEMO_WEIGHTS",
    "demo_network",
    "demo_preprocessing_kwargs",
    "load_demo_model",
]
