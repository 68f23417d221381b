"""CAM formulas: how a map is formed from the activation and its gradient, and nothing else.

Notation: ``A`` = hooked activation ``[B, K, *f]`` (float32), ``g = dS/dA`` (same shape), ``S`` the explained score,
``N`` = number of feature-grid positions. Maps are pre-ReLU on the feature grid; the executor
(:mod:`medcam.executor`) upsamples them and applies the ReLU.

A formula is a small stateless object of one of two kinds, told apart by its class (executors dispatch on it):

* :class:`ElementwiseFormula`: ``map(A, g) -> [B, *f]`` position by position (HiResCAM, LayerCAM). With sliding
  windows each window's map is formed from its own gradient (which carries its blending weight) and the maps add up.
* :class:`PooledFormula`: ``map = sum_k alpha_k A_k`` with channel weights ``alpha`` from statistics that are sums
  over the feature grid (:meth:`~PooledFormula.gradient_statistics`), so an executor can add them over windows and
  form one global ``alpha`` (:meth:`~PooledFormula.weights`). Its subclass :class:`ActivationPooledFormula` also
  needs statistics of the activation alone (XGrad-CAM's denominator, Grad-CAM++'s ``sum_v A_k``), which a
  sliding-window executor gathers over every window in one more forward-only pass.

A new method is one subclass of one of these with its one or two formulas (like pytorch-grad-cam's one override per
method); a new executor needs nothing from a formula beyond this interface.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Formula",
    "ElementwiseFormula",
    "PooledFormula",
    "ActivationPooledFormula",
    "GradCAM",
    "HiResCAM",
    "XGradCAM",
    "GradCAMPlusPlus",
    "LayerCAM",
    "Statistics",
    "spatial_sum",
    "weighted_channel_sum",
]

#: named statistics, each ``[B, K]`` (one value per sample and channel)
Statistics = dict[str, torch.Tensor]


def spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the spatial dims: ``[B, K, *f] -> [B, K]``."""
    return x.flatten(2).sum(-1)


def weighted_channel_sum(alpha: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha[b, k] * A[b, k, u]`` -> ``[B, *f]``."""
    shape = (*alpha.shape, *([1] * (activation.ndim - 2)))
    return (alpha.reshape(shape) * activation).sum(dim=1)


class Formula:
    """Base of the two formula kinds; use :class:`ElementwiseFormula` or :class:`PooledFormula`."""

    def map(self, activation: torch.Tensor, grad: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """Pre-ReLU map ``[B, *f]`` of a whole image from ``A`` and ``g`` (both ``[B, K, *f]``); ``layer``: the
        hooked layer's name, for warnings only."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ElementwiseFormula(Formula):
    """A map formed position by position from ``A`` and ``g``: override :meth:`map`."""


class PooledFormula(Formula):
    """``map = sum_k alpha_k A_k`` with pooled channel weights: override :meth:`gradient_statistics` and
    :meth:`weights`."""

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        """Statistics ``{name: [B, K]}`` that involve the gradient, as sums over the feature grid.

        Additive over sliding windows (each window's gradient already carries its blending weight) and zero for
        windows outside the ROI. ``activation_stats``: the whole image's/volume's :meth:`activation_statistics`
        (:class:`ActivationPooledFormula` only; None means "of this ``activation``").
        """
        raise NotImplementedError

    def activation_statistics(self, activation: torch.Tensor, weight: torch.Tensor | None) -> Statistics:
        """Statistics of the activation alone (none for a plain pooled formula)."""
        return {}

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        """Channel weights ``alpha`` ``[B, K]`` from the summed statistics; ``n_positions`` = N; ``layer``: the hooked
        layer's name, for warnings only."""
        raise NotImplementedError

    def map(self, activation: torch.Tensor, grad: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        n = float(math.prod(activation.shape[2:]))
        act_stats = self.activation_statistics(activation, None)
        stats = {**self.gradient_statistics(activation, grad, act_stats or None), **act_stats}
        return weighted_channel_sum(self.weights(stats, n, layer), activation)


class ActivationPooledFormula(PooledFormula):
    """A pooled formula whose weights also need statistics of the activation over the whole image/volume."""

    def activation_statistics(self, activation: torch.Tensor, weight: torch.Tensor | None) -> Statistics:
        """Statistics ``{name: [B, K]}`` of the activation alone, as sums over the feature grid.

        ``weight`` ``[B, 1, *f]``: a window's normalised blending weight on the feature grid (None for a whole
        image, i.e. 1), so that overlapping windows count each feature position once. A sliding-window executor
        takes them over every window, not only the ROI windows, before the gradient pass.
        """
        raise NotImplementedError


class GradCAM(PooledFormula):
    """Grad-CAM: ``alpha_k = (1/N) sum_u g_k(u)`` (mean gradient over the feature grid)."""

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        return {"grad": spatial_sum(grad)}

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        return stats["grad"] / n_positions


class HiResCAM(ElementwiseFormula):
    """HiResCAM: ``map(u) = sum_k g_k(u) A_k(u)``."""

    def map(self, activation: torch.Tensor, grad: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        return (grad * activation).sum(dim=1)


class LayerCAM(ElementwiseFormula):
    """LayerCAM: ``map(u) = sum_k ReLU(g_k(u)) A_k(u)``."""

    def map(self, activation: torch.Tensor, grad: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        return (torch.relu(grad) * activation).sum(dim=1)


class XGradCAM(ActivationPooledFormula):
    """XGrad-CAM: ``alpha_k = sum_u g_k(u) A_k(u) / (sum_u A_k(u) + eps)``."""

    eps = 1e-7

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        return {"grad_act": spatial_sum(grad * activation)}

    def activation_statistics(self, activation: torch.Tensor, weight: torch.Tensor | None) -> Statistics:
        return {"act": spatial_sum(activation if weight is None else activation * weight)}

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        return stats["grad_act"] / (stats["act"] + self.eps)


class GradCAMPlusPlus(ActivationPooledFormula):
    """Grad-CAM++ with the usual exponential-score simplification.

    ``alpha_k = sum_u a_k(u) ReLU(g_k(u))``, ``a_k(u) = g^2 / (2 g^2 + (sum_v A_k(v)) g^3)`` (``a = 0`` where the
    denominator is 0). ``sum_v A_k(v)`` is the activation sum of the whole grid (over every window, blended, with a
    sliding window), hence an :class:`ActivationPooledFormula`. Computed in float64: the denominator nearly cancels
    where ``g`` is close to ``-2 / sum_v A_k(v)``.

    Signed activations: the closed form assumes ``A >= 0`` (a post-ReLU layer, as in the paper). Where a channel's
    sum ``sum_v A_k(v)`` is negative, the denominator crosses zero at ``g = -2 / sum_v A_k(v)`` and ``alpha_k``
    swings by orders of magnitude for tiny changes of ``g``: :meth:`weights` then warns, naming the layer.
    """

    def activation_statistics(self, activation: torch.Tensor, weight: torch.Tensor | None) -> Statistics:
        act = activation.double()  # float64 like the rest of the formula: a float32 sum moves the poles
        return {"act": spatial_sum(act if weight is None else act * weight.double())}

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        act, g = activation.double(), grad.double()
        g2 = g * g
        total = spatial_sum(act) if activation_stats is None else activation_stats["act"].double()
        sum_a = total[(..., *([None] * (act.ndim - 2)))]
        denom = 2 * g2 + sum_a * g2 * g
        a = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
        return {"alpha": spatial_sum(a * torch.relu(g)).to(activation.dtype)}

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        act = stats.get("act")
        if act is not None and bool((act < 0).any()):
            logger.warning(
                "Grad-CAM++ on layer %r: %d channel(s) have a negative activation sum, but its closed form assumes "
                "non-negative (post-ReLU) activations; near g = -2/sum(A) the channel weights swing wildly. Explain "
                "a layer whose output follows a ReLU (an activation module in `medcam layers` / "
                "medcam.list_layers that runs once per forward), or use hirescam, gradcam, xgradcam or layercam",
                layer,
                int((act < 0).sum()),
            )
        return stats["alpha"]
