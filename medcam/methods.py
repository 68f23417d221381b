"""The CAM methods: one small class each, saying only how the map is formed.

Notation: ``A`` = hooked activation ``[B, K, *f]``, ``g = dS/dA`` (same shape), ``S = sum_u M(u) y_c(u)`` the ROI
score, ``N`` = number of feature-grid positions. Maps are pre-ReLU on the feature grid; the engine
(:mod:`medcam.engine`) upsamples them and applies the ReLU. Statistics are sums over the feature grid so that the
sliding-window engine can add them over windows (see ``BaseSegCAM.gradient_statistics``).
"""

from __future__ import annotations

import logging

import torch

from .engine import BaseSegCAM

logger = logging.getLogger(__name__)

__all__ = ["SegGradCAM", "SegHiResGradCAM", "SegXGradCAM", "SegGradCAMPlusPlus", "SegLayerCAM", "METHODS"]


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the spatial dims: ``[B, K, *f] -> [B, K]``."""
    return x.flatten(2).sum(-1)


class SegGradCAM(BaseSegCAM):
    """Seg-Grad-CAM (Vinogradova, Dibrov & Myers, AAAI 2020): Grad-CAM for a region of a segmentation output.

    ``map = sum_k alpha_k A_k``, ``alpha_k = (1/N) sum_u g_k(u)`` (mean gradient over the feature grid).
    With an inferer, ``sum_u g_k`` runs over every window and ``N`` counts the feature positions covering the whole
    volume, so ``alpha`` is one global weight vector.
    """

    elementwise = False

    def gradient_statistics(self, activation, grad, activation_stats=None):
        return {"grad": _spatial_sum(grad)}

    def weights_from_statistics(self, stats, n_positions):
        return stats["grad"] / n_positions


class SegHiResGradCAM(BaseSegCAM):
    """Seg-HiRes-Grad-CAM (Rheude et al. 2024), i.e. HiResCAM (Draelos & Carin 2020) on an ROI score.

    ``map(u) = sum_k g_k(u) A_k(u)`` (element-wise gradient x activation, summed over channels). With a linear 1x1
    head on ``A`` it equals ``M * (y_c - b_c)`` exactly: the map shows what each position added to the score.
    """

    def elementwise_map(self, activation, grad):
        return (grad * activation).sum(dim=1)


class SegXGradCAM(BaseSegCAM):
    """XGrad-CAM (Fu et al., BMVC 2020) on an ROI score.

    ``map = sum_k alpha_k A_k``, ``alpha_k = sum_u g_k(u) A_k(u) / (sum_u A_k(u) + eps)``.
    Its map sums to the same value as HiResCAM's (``sum_{k,u} g A``) whenever ``sum_u A_k != 0``.
    """

    elementwise = False
    uses_activation_statistics = True
    eps = 1e-7

    def gradient_statistics(self, activation, grad, activation_stats=None):
        return {"grad_act": _spatial_sum(grad * activation)}

    def activation_statistics(self, activation, weight):
        return {"act": _spatial_sum(activation if weight is None else activation * weight)}

    def weights_from_statistics(self, stats, n_positions):
        return stats["grad_act"] / (stats["act"] + self.eps)


class SegGradCAMPlusPlus(BaseSegCAM):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018) on an ROI score, with the usual exponential-score simplification.

    ``map = sum_k alpha_k A_k``, ``alpha_k = sum_u a_k(u) ReLU(g_k(u))``,
    ``a_k(u) = g^2 / (2 g^2 + (sum_v A_k(v)) g^3)`` (``a = 0`` where the denominator is 0, e.g. ``g = 0``).
    ``a`` depends non-linearly on ``sum_v A_k(v)``, the activation sum of the whole grid. With an inferer that sum is
    taken first, over every window with the blending weights (as XGrad-CAM's denominator), and each window's
    ``a_k(u) ReLU(g_k(u))`` is then formed with it: ``alpha`` adds up over windows and one window covering the volume
    gives the whole-volume result.

    Signed activations: the closed form assumes ``A >= 0`` (a post-ReLU layer, as in the paper). Where a channel's
    sum ``sum_v A_k(v)`` is negative, the denominator ``2 g^2 + sum_v A_k(v) g^3`` crosses zero at
    ``g = -2 / sum_v A_k(v)`` and ``alpha_k`` swings by orders of magnitude for tiny changes of ``g``. A warning names
    the layer when this happens: explain a layer that follows a ReLU, or use another method.
    """

    elementwise = False
    uses_activation_statistics = True

    def activation_statistics(self, activation, weight):
        act = activation.double()  # float64 like the rest of the formula: a float32 sum moves the poles
        return {"act": _spatial_sum(act if weight is None else act * weight.double())}

    def gradient_statistics(self, activation, grad, activation_stats=None):
        # float64: the denominator nearly cancels where g is close to -2 / sum_v A_k(v)
        act, grad = activation.double(), grad.double()
        g2 = grad * grad
        total = _spatial_sum(act) if activation_stats is None else activation_stats["act"].double()
        sum_a = total[(..., *([None] * (act.ndim - 2)))]
        denom = 2 * g2 + sum_a * g2 * grad
        a = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
        return {"alpha": _spatial_sum(a * torch.relu(grad)).to(activation.dtype)}

    def weights_from_statistics(self, stats, n_positions):
        act = stats.get("act")
        if act is not None and bool((act < 0).any()) and not getattr(self, "_warned_signed", False):
            self._warned_signed = True
            neg = int((act < 0).sum())
            logger.warning(
                "Grad-CAM++ on layer %r: %d channel(s) have a negative activation sum, but its closed form assumes "
                "non-negative (post-ReLU) activations; near g = -2/sum(A) the channel weights swing wildly. Explain "
                "a layer whose output follows a ReLU (an activation module in `medcam layers` / "
                "medcam.list_layers that runs once per forward), or use hirescam, gradcam, xgradcam or layercam",
                self.layer_name,
                neg,
            )
        return stats["alpha"]


class SegLayerCAM(BaseSegCAM):
    """LayerCAM (Jiang et al., TIP 2021) on an ROI score: ``map(u) = sum_k ReLU(g_k(u)) A_k(u)``."""

    def elementwise_map(self, activation, grad):
        return (torch.relu(grad) * activation).sum(dim=1)


#: name -> class, for the CLI and configuration files
METHODS: dict[str, type[BaseSegCAM]] = {
    "gradcam": SegGradCAM,
    "hirescam": SegHiResGradCAM,
    "xgradcam": SegXGradCAM,
    "gradcam++": SegGradCAMPlusPlus,
    "layercam": SegLayerCAM,
}
