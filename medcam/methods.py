"""The CAM methods: one small explainer class each, naming its formula (:mod:`medcam.formulas`).

Notation: ``A`` = hooked activation ``[B, K, *f]``, ``g = dS/dA`` (same shape), ``S = sum_u M(u) y_c(u)`` the ROI
score, ``N`` = number of feature-grid positions. Maps are pre-ReLU on the feature grid; the executors upsample them
and apply the ReLU. :data:`METHODS` is the registry used by the command line, the pipeline and the tests: a method
added there is offered everywhere and tested like the others.
"""

from __future__ import annotations

from .engine import BaseSegCAM
from .formulas import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

__all__ = ["SegGradCAM", "SegHiResGradCAM", "SegXGradCAM", "SegGradCAMPlusPlus", "SegLayerCAM", "METHODS"]


class SegGradCAM(BaseSegCAM):
    """Seg-Grad-CAM (Vinogradova, Dibrov & Myers, AAAI 2020): Grad-CAM for a region of a segmentation output.

    ``map = sum_k alpha_k A_k``, ``alpha_k = (1/N) sum_u g_k(u)`` (mean gradient over the feature grid).
    With an inferer, ``sum_u g_k`` runs over every window and ``N`` counts the feature positions covering the whole
    volume, so ``alpha`` is one global weight vector.
    """

    formula = GradCAM()


class SegHiResGradCAM(BaseSegCAM):
    """Seg-HiRes-Grad-CAM (Rheude et al. 2024), i.e. HiResCAM (Draelos & Carin 2020) on an ROI score.

    ``map(u) = sum_k g_k(u) A_k(u)`` (element-wise gradient x activation, summed over channels). With a linear 1x1
    head on ``A`` it equals ``M * (y_c - b_c)`` exactly: the map shows what each position added to the score.
    """

    formula = HiResCAM()


class SegXGradCAM(BaseSegCAM):
    """XGrad-CAM (Fu et al., BMVC 2020) on an ROI score.

    ``map = sum_k alpha_k A_k``, ``alpha_k = sum_u g_k(u) A_k(u) / (sum_u A_k(u) + eps)``.
    Its map sums to the same value as HiResCAM's (``sum_{k,u} g A``) whenever ``sum_u A_k != 0``.
    """

    formula = XGradCAM()


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

    formula = GradCAMPlusPlus()


class SegLayerCAM(BaseSegCAM):
    """LayerCAM (Jiang et al., TIP 2021) on an ROI score: ``map(u) = sum_k ReLU(g_k(u)) A_k(u)``."""

    formula = LayerCAM()


#: name -> class, for the CLI, configuration files and the tests
METHODS: dict[str, type[BaseSegCAM]] = {
    "gradcam": SegGradCAM,
    "hirescam": SegHiResGradCAM,
    "xgradcam": SegXGradCAM,
    "gradcam++": SegGradCAMPlusPlus,
    "layercam": SegLayerCAM,
}


def _register_more() -> None:
    """Methods defined in their own modules (issue 18): MI-CAM, MI-Grad-CAM."""
    from .micam import SegMICAM, SegMIGradCAM

    METHODS.update({"micam": SegMICAM, "migradcam": SegMIGradCAM})


def resolve_method(spec: str) -> tuple[str, type[BaseSegCAM]]:
    """``(key, class)`` for a method name of :data:`METHODS` (case-insensitive) or ``synth:FILE`` (a SyCAM expression
    saved by :meth:`medcam.SynthesizedCAM.save`; key ``synth-<file stem>``, usable in file names)."""
    from pathlib import Path

    from .errors import MedcamError

    if spec.startswith("synth:"):
        from .sycam import SynthesizedCAM

        path = spec[len("synth:") :]
        return f"synth-{Path(path).stem}", SynthesizedCAM.class_from_file(path)
    if spec.lower() not in METHODS:
        raise MedcamError(f"unknown method {spec!r}; choose from {', '.join(METHODS)} or synth:FILE")
    return spec.lower(), METHODS[spec.lower()]


_register_more()  # at import: the registry is complete whoever imports it first
