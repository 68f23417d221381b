""":class:`BaseSegCAM`: the public explainer, i.e. configuration plus the choice of executor.

It holds a :class:`~medcam.runner.ModelRunner` (running the model), a formula (:mod:`medcam.formulas`, set by each
method class in :mod:`medcam.methods`) and makes the pass plan of the prediction it explains
(:func:`medcam.plan.whole_plan` without an inferer, :func:`medcam.sliding.monai_plan` with a MONAI
``SlidingWindowInferer``; a framework adapter gives its own plan to :meth:`BaseSegCAM.explain_plan`), which
:func:`medcam.executor.execute` runs (methods with their own passes, MI-CAM, override ``_execute``).

Order of operations (fixed): pre-ReLU map on the feature grid -> (bi/tri)linear upsampling (align_corners=False) to
the input size -> ReLU. Nothing is normalised; use :func:`medcam.normalize` explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .errors import MedcamError
from .executor import execute
from .formulas import Formula
from .kept_graphs import check_graph_budget
from .plan import PassPlan, whole_plan
from .result import CAMResult, Upsampler, interpolate_upsampler
from .runner import ModelRunner, OutputActivation, ReshapeTransform, validate_image
from .sliding import check_inferer, monai_plan, window_example
from .targets import Target, as_target_list

__all__ = ["BaseSegCAM", "CAMResult", "interpolate_upsampler", "Upsampler", "check_spatial_dims"]

logger = logging.getLogger(__name__)


class BaseSegCAM:
    """Gradient-based CAM for a region of interest of a segmentation output (2D or 3D).

    A method is a subclass that sets :attr:`formula` (see :mod:`medcam.methods`).

    Args:
        model: any PyTorch segmentation network ``[B, Cin, *S] -> [B, C, *S]`` (classifiers ``-> [B, C]`` work too).
            It is never modified: eval mode is used during the call, every module's mode and every parameter's
            ``requires_grad`` flag are restored afterwards, hooks are removed, no ``.grad`` is created.
        layer: dotted name from ``model.named_modules()``, the module itself, or ``"auto"`` (coarsest feature layer
            that is not the head, i.e. the U-Net bottleneck; chosen at the first call and logged).
        inferer: optional ``monai.inferers.SlidingWindowInferer``; whole volumes are then explained window by
            window with MONAI's grid and blending (see :mod:`medcam.sliding`).
        amp: run forward/backward under ``torch.autocast`` (bf16 where supported, else fp16); maps are formed in fp32.
        amp_dtype: override the autocast dtype.
        score: ``"logits"`` (default, as in the Seg-Grad-CAM paper) or ``"probability"`` (apply
            ``output_activation`` before summing over the ROI).
        output_activation: ``"sigmoid"`` or ``"softmax"``; required with ``score="probability"``. ``"none"``: the
            network ends in its own sigmoid/softmax, its outputs are probabilities (``score="probability"`` then
            sums them as they are; pass ``activation="none"`` to :class:`~medcam.targets.PredictedROI` too).
        upsampler: ``upsampler(maps [B, K, *f], size) -> [B, K, *size]``; default :func:`interpolate_upsampler`.
        output_index: which element to explain when the model returns a tuple/list (e.g. deep supervision).
        progress: show a tqdm bar over windows (sliding-window mode).
        reshape_transform: for layers whose output is not a feature map ``[B, K, *f]``, e.g. ViT tokens
            ``[B, N, C]``: ``transform(output, input spatial size) -> [B, K, *f]``, applied alike to the activation
            and its gradient (use :class:`medcam.TokenGrid` for UNETR's ``vit.blocks.N``).
        graph_budget: bytes of autograd graphs kept when a predicted-region target (or a probability score) needs
            the prediction of several passes: the prediction is then blended from the explanation's own pass and
            only the backward passes follow (:mod:`medcam.kept_graphs`); passes over the budget are recomputed,
            with the same result. None (default): half the free memory where the network runs; 0: keep none.
    """

    #: how the map is formed (a :class:`~medcam.formulas.ElementwiseFormula` or
    #: :class:`~medcam.formulas.PooledFormula`); set by every method class
    formula: ClassVar[Formula]
    #: False for a method whose weights are not additive over sliding windows (refused with an inferer)
    supports_sliding_window: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module = "auto",
        *,
        inferer: Any | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        score: Literal["logits", "probability"] = "logits",
        output_activation: OutputActivation | None = None,
        upsampler: Upsampler | None = None,
        output_index: int = 0,
        progress: bool = False,
        reshape_transform: ReshapeTransform | None = None,
        graph_budget: int | None = None,
    ):
        self.graph_budget = check_graph_budget(graph_budget)
        if not isinstance(getattr(type(self), "formula", None), Formula):
            raise MedcamError(f"{type(self).__name__} has no formula: use a method of medcam.METHODS")
        self.runner = ModelRunner(
            model,
            layer,
            amp=amp,
            amp_dtype=amp_dtype,
            output_index=output_index,
            reshape_transform=reshape_transform,
            score=score,
            output_activation=output_activation,
        )
        self.upsampler: Upsampler = upsampler or interpolate_upsampler
        self.progress = progress
        if inferer is not None:
            check_inferer(inferer)
            if not self.supports_sliding_window:
                raise MedcamError(
                    f"{type(self).__name__} cannot be explained with a sliding-window inferer: its channel weights "
                    "are not additive over windows. Use one of medcam.METHODS, or inferer=None"
                )
        self.inferer = inferer

    # ------------------------------------------------------------------ configuration (read-only views)
    @property
    def model(self) -> nn.Module:
        return self.runner.model

    @property
    def layer_name(self) -> str | None:
        """Dotted name of the hooked layer (None until ``layer="auto"`` is resolved at the first call)."""
        return self.runner.layer_name

    @property
    def layer_module(self) -> nn.Module | None:
        return self.runner.layer_module

    @property
    def amp(self) -> bool:
        return self.runner.amp

    @property
    def score(self) -> str:
        return self.runner.score

    @property
    def output_activation(self) -> str | None:
        return self.runner.output_activation

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        image: torch.Tensor,
        targets: Target | Sequence[Target],
        *,
        relu: bool = True,
        upsample: bool = True,
    ) -> torch.Tensor:
        """Maps ``[B, K, *S]`` (float32, on ``image.device``) for ``image`` ``[B, Cin, *S]`` and K targets."""
        return self.explain(image, targets, relu=relu, upsample=upsample).maps

    def explain(
        self,
        image: torch.Tensor,
        targets: Target | Sequence[Target],
        *,
        relu: bool = True,
        upsample: bool = True,
        output: torch.Tensor | None = None,
    ) -> CAMResult:
        """Like ``__call__`` but returns a :class:`CAMResult` with scores, ROI sizes and the model output.

        Args:
            output: sliding-window mode only: the blended output ``[B, C, *S]`` of ``sliding_window_inference`` with
                the same model and inferer settings, if you already ran inference. It spares the prediction pass
                that :class:`~medcam.targets.PredictedROI`/:class:`~medcam.targets.ComponentROI` or
                ``score="probability"`` otherwise need.
        """
        self._check_mode_options(output, upsample)
        image, tl = self._prepare(image, targets)
        plan = whole_plan(image) if self.inferer is None else monai_plan(self.inferer, image)
        return self._execute(plan, tl, relu=relu, upsample=upsample, output=output)

    def explain_plan(
        self,
        plan: PassPlan,
        targets: Target | Sequence[Target],
        *,
        relu: bool = True,
        output: torch.Tensor | None = None,
        progress: bool | None = None,
    ) -> CAMResult:
        """Explain the prediction a framework adapter describes by its pass plan (e.g. nnU-Net's folds x tiles x
        mirrors, :mod:`medcam.frameworks.nnunet`), with this method's own execution.

        Args:
            plan: the plan, on the explainer's model (its ``image`` ``[B, Cin, *P]``).
            targets: targets on the prediction ``Y`` ``[B, C, *S]``.
            relu: apply ReLU to the stitched maps.
            output: ``Y`` if the caller already has it (spares the prediction a target or the score needs).
            progress: tqdm bars per pass (default: the explainer's ``progress``).

        Returns:
            :class:`CAMResult`: maps ``[B, K, *S]`` (float32, on ``plan.device``), scores ``[B, K]``, ``output`` =
            ``Y`` when known, ``stats``. Refused before any pass: a method that cannot follow several passes.
        """
        tl = as_target_list(targets)
        if not plan.single_pass and not self.supports_sliding_window:
            raise MedcamError(
                f"{type(self).__name__} cannot explain a prediction of several network passes: its channel weights "
                "are not additive over passes. Use one of medcam.METHODS"
            )
        self.runner.ensure_layer(plan.layer_example())
        shown = self.progress
        self.progress = shown if progress is None else progress
        try:
            return self._execute(plan, tl, relu=relu, upsample=True, output=output)
        finally:
            self.progress = shown

    def _prepare(self, image: Any, targets: Target | Sequence[Target]) -> tuple[torch.Tensor, list[Target]]:
        """Checked image ``[B, Cin, *S]`` and target list; the hooked layer resolved (on one window with an
        inferer). Everything here runs before any pass over the volume."""
        tl = as_target_list(targets)
        image = validate_image(image)
        check_spatial_dims(image, self.inferer)
        self.runner.ensure_layer(image[:1] if self.inferer is None else window_example(self.inferer, image))
        return image, tl

    def _execute(
        self,
        plan: PassPlan,
        tl: list[Target],
        *,
        relu: bool,
        upsample: bool,
        output: torch.Tensor | None,
    ) -> CAMResult:
        """Run :func:`~medcam.executor.execute` on ``plan`` with this method's formula. Methods whose weights are
        not gradient statistics (MI-CAM) override this."""
        return execute(
            self.runner,
            self.formula,
            plan,
            tl,
            upsampler=self.upsampler,
            relu=relu,
            upsample=upsample,
            progress=self.progress or bool(getattr(self.inferer, "progress", False)),
            output=output,
            graph_budget=self.graph_budget,
        )

    def _check_mode_options(self, output: torch.Tensor | None, upsample: bool) -> None:
        """``output=`` needs an inferer; an inferer needs ``upsample=True`` (window maps are stitched on the input
        grid). Checked before any model work, by every explainer's ``explain``."""
        if output is not None and self.inferer is None:
            raise MedcamError("output= is for the sliding-window mode; without an inferer the forward pass gives it")
        if self.inferer is not None and not upsample:
            raise MedcamError(
                "upsample=False is not available with an inferer: window maps are stitched on the input grid"
            )


def check_spatial_dims(image: torch.Tensor, inferer: Any = None) -> None:
    """Refuse an image whose number of dims does not fit the sliding window given per spatial dim.

    The usual mistake is an unbatched ``[C, *S]`` volume: MONAI would fail deep inside with an unrelated message
    ("Sequence must have length 2"). (Without an inferer, :func:`medcam.hooks.run_model` reports the model's failure
    with the shapes it expects.)
    """
    roi = getattr(inferer, "roi_size", None) if inferer is not None else None
    if not isinstance(roi, (tuple, list)) or not roi:
        return
    nd = len(roi)
    if image.ndim != nd + 2:
        raise MedcamError(
            f"image has shape {tuple(image.shape)} but the sliding window roi_size {tuple(roi)} has {nd} spatial "
            f"dims: give [B, C, {', '.join('XYZ'[:nd]) if nd <= 3 else '*spatial'}] ({nd + 2} dims; for a single "
            "[C, *spatial] volume use image[None])"
        )
