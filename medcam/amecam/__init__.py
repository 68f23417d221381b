"""AME-CAM: attentive multiple-exit class activation maps (Chen, Hu, Shi, Ho, MICCAI 2023).

Two forms:

* the published weakly supervised method on 2D slices (:class:`ResNet18IN` multi-exit classifier,
  :class:`AttentionAggregator` trained with the contrastive loss of :mod:`.contrastive`, slices from :mod:`.slices`);
* :class:`AMECAM`, the multi-resolution aggregation of a segmentation network's CAMs at several layers
  (:mod:`.segmentation`).
"""

from .attention import (
    AttentionAggregator,
    apply_polarity,
    fit_attention,
    mean_aggregate,
    minmax_maps,
    region_logit_polarity,
)
from .classifier import (
    DEFAULT_EXIT_WEIGHTS,
    ExitLogit,
    ResNet18IN,
    ame_cam_maps,
    exit_cams,
    multi_exit_loss,
    pretrain_contrastive,
    train_classifier,
)
from .contrastive import c2am_loss, cosine_matrix, nt_xent_loss, sim_max_loss, sim_min_loss
from .slices import (
    SliceSet,
    extract_slices,
    load_modality_and_labels,
    minmax_volume,
    per_slice_metrics,
    summarise,
)

__all__ = [
    "AttentionAggregator",
    "apply_polarity",
    "fit_attention",
    "mean_aggregate",
    "minmax_maps",
    "region_logit_polarity",
    "DEFAULT_EXIT_WEIGHTS",
    "ExitLogit",
    "ResNet18IN",
    "ame_cam_maps",
    "exit_cams",
    "multi_exit_loss",
    "pretrain_contrastive",
    "train_classifier",
    "c2am_loss",
    "cosine_matrix",
    "nt_xent_loss",
    "sim_max_loss",
    "sim_min_loss",
    "SliceSet",
    "extract_slices",
    "load_modality_and_labels",
    "minmax_volume",
    "per_slice_metrics",
    "summarise",
]
from .segmentation import AMECAM  # noqa: E402, F401  (re-exported; needs the core engine: medcam.SegHiResGradCAM)

__all__.append("AMECAM")
