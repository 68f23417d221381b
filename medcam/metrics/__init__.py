"""Evaluation metrics for CAMs of (3D) segmentation networks: localisation, faithfulness (deletion / insertion,
average drop / increase, ROAD), robustness to noise, sanity (cascading randomisation) and method ensembles.

All metrics are torch, batched over leading dims (maps ``[..., *S]``), keep tensors on the input's device, and do not
depend on the CAM engine: faithfulness metrics take a batched ``score_fn(images [N, Cin, *S]) -> [N]`` (see
:func:`make_score_fn`), sanity / robustness take map and segmentation callables.
"""

from .ensemble import ConsensusResult, consensus, top_k_masks
from .faithfulness import (
    CurveResult,
    ScoreFunction,
    average_drop_increase,
    deletion_curve,
    insertion_curve,
    make_baseline,
    make_score_fn,
    perturbation_curve,
    tied_fraction,
    voxel_ranks,
)
from .localisation import (
    HD95_CONVENTIONS,
    dice_score,
    energy_pointing_game,
    hausdorff95,
    hd95_key,
    iou_score,
    localisation_scores,
    pointing_game,
    threshold_sweep,
    volume_diagonal_mm,
)
from .road import DEFAULT_PERCENTILES, RoadResult, noisy_linear_imputation, road, stencil_weights
from .robustness import RobustnessResult, add_noise, robustness
from .sanity import (
    SanityResult,
    cascading_randomization,
    freeze_targets,
    map_similarity,
    pearson,
    rankdata,
    spearman,
    ssim,
)
from .thresholds import normalize_maps, otsu_threshold, percentile_threshold, threshold_maps

__all__ = [
    "ConsensusResult", "consensus", "top_k_masks",
    "CurveResult", "ScoreFunction", "average_drop_increase", "deletion_curve", "insertion_curve", "make_baseline",
    "make_score_fn", "perturbation_curve", "tied_fraction", "voxel_ranks",
    "HD95_CONVENTIONS", "dice_score", "energy_pointing_game", "hausdorff95", "hd95_key", "iou_score", "localisation_scores", "pointing_game",
    "threshold_sweep", "volume_diagonal_mm",
    "DEFAULT_PERCENTILES", "RoadResult", "noisy_linear_imputation", "road", "stencil_weights",
    "RobustnessResult", "add_noise", "robustness",
    "SanityResult", "cascading_randomization", "freeze_targets", "map_similarity", "pearson", "rankdata", "spearman", "ssim",
    "normalize_maps", "otsu_threshold", "percentile_threshold", "threshold_maps",
]  # fmt: skip
