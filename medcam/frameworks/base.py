"""The framework adapter protocol: how a model of any framework enters medcam's one case pipeline.

A framework (medcam's own demo/factory networks, MONAI bundles, nnU-Net v2, ...) is an **adapter**, never a second
pipeline. The pipeline (:mod:`medcam.pipeline.run`) asks the adapter of a loaded model for:

* the network and the names and activation of its outputs (:class:`Activation`, read from the framework's own
  postprocessing where it has one);
* the cases of the inputs (:meth:`FrameworkAdapter.discover`; each :class:`~medcam.pipeline.CaseSource` carries its
  resolved files) and one case on the model's grid (:meth:`FrameworkAdapter.load_case`: the framework's own
  preprocessing; the returned :class:`ModelCase` knows the way back to the original grid, ``invert``);
* the targets on that grid (:meth:`FrameworkAdapter.targets`: masks, boxes and labels given on the original grid
  taken there by the framework's own preprocessing);
* the framework's prediction (:meth:`FrameworkAdapter.predict`) and the **pass plan** of that prediction
  (:meth:`FrameworkAdapter.plan`, a :class:`~medcam.plan.PassPlan`: the network passes - folds x windows x flips -
  and the weights the framework blends them with: one pass for a whole image, MONAI's sliding window, nnU-Net's
  tiles x mirrors x folds). Every method explains every plan through the one executor (:func:`explain`,
  :mod:`medcam.executor`); an adapter holds no pass logic;
* the prediction of other images on the case's grid (:meth:`FrameworkAdapter.predict_image`: ``medcam evaluate``
  re-runs the framework's own prediction on perturbed copies of the case) and the case's reference label on the
  model's grid (:meth:`FrameworkAdapter.reference_regions`, ``medcam evaluate``'s localisation);
* the segmentation on the original grid in the framework's own dtype (:meth:`FrameworkAdapter.segmentation`).

Everything else - the case folder (``heatmaps/``, ``overlays/``, ``montage.png``, ``slicer/``, ``segmentation``,
``summary.json``), resume, parts, Ray, the report - is the pipeline's and the same for every framework. The
adapters: :class:`medcam.pipeline.models.MonaiAdapter` (demo and factory networks, medcam's preprocessing),
:class:`medcam.pipeline.models.BundleAdapter` (MONAI bundles: their preprocessing, inferer, postprocessing
activation and ``Invertd``), :class:`medcam.frameworks.nnunet.NnUNetModel` (nnU-Net's preprocessor,
predictor settings and export). ``docs/frameworks.md`` says how to add one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from ..plan import PassPlan
    from ..result import CAMResult

__all__ = [
    "explain",
    "Activation",
    "Framework",
    "FrameworkAdapter",
    "ModelCase",
    "Postprocessing",
    "read_monai_postprocessing",
    "segmentation_dtype",
]


class Activation(str, enum.Enum):
    """The output activation of a model, i.e. how its prediction is formed from the network's output.

    ``SIGMOID``: one independent probability per channel, predicted where ``sigmoid(y) > threshold`` (multi-label,
    e.g. BraTS regions); ``SOFTMAX``: one label per voxel, the channel of the largest output (``softmax`` +
    ``argmax``); ``NONE``: the network ends in its own activation, its outputs are probabilities thresholded as
    they are. A ``str`` enum: ``Activation.SIGMOID == "sigmoid"``, written to JSON as its value.
    """

    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    NONE = "none"

    @classmethod
    def of(cls, value: str | Activation) -> Activation:
        """``"sigmoid"`` / ``"softmax"`` / ``"none"`` (or an Activation) -> Activation (ValueError otherwise)."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"activation must be one of {', '.join(a.value for a in cls)}, got {value!r}") from None


class Framework(str, enum.Enum):
    """Where a model comes from; each has its own adapter (the summary's ``model.kind``)."""

    DEMO = "demo"
    FACTORY = "factory"
    MODULE = "module"
    BUNDLE = "bundle"
    NNUNET = "nnunet"


@dataclass(frozen=True)
class Postprocessing:
    """What a framework's own postprocessing does to the network output (read, never re-implemented).

    Attributes:
        activation: the activation it applies (None: it applies none medcam could read).
        threshold: the probability threshold of its discretisation (``AsDiscreted(threshold=...)``), or None.
        argmax: it takes the argmax over channels (``AsDiscreted(argmax=True)``).
        invertd: it maps the output back to the original grid with ``Invertd``.
    """

    activation: Activation | None = None
    threshold: float | None = None
    argmax: bool = False
    invertd: bool = False


def _flag(value: Any) -> bool:
    """A MONAI per-key flag (bool, or a tuple of them per key) -> True when set for any key."""
    if isinstance(value, (bool, int)):
        return bool(value)
    return any(bool(v) for v in value or ())


def read_monai_postprocessing(post: Any) -> Postprocessing:
    """Read a MONAI postprocessing ``Compose`` (or a list of its transforms): its ``Activationsd``/``Activations``, ``AsDiscreted`` and ``Invertd``.

    The flags are read from the transforms' own attributes (``Activationsd.sigmoid``/``.softmax`` are per-key tuples;
    its ``converter`` holds none of them). ``softmax`` (or ``argmax`` discretisation without a sigmoid) gives
    :attr:`Activation.SOFTMAX`; ``sigmoid`` gives :attr:`Activation.SIGMOID`.
    """
    from monai.transforms import Activations, Activationsd, AsDiscrete, AsDiscreted, Invertd

    act: Activation | None = None
    threshold: float | None = None
    argmax = invertd = False
    if isinstance(post, (list, tuple)):
        items = list(post)
    else:
        items = list(getattr(post, "transforms", None) or ([post] if post is not None else []))
    for t in items:
        if isinstance(t, (Activationsd, Activations)):
            if _flag(getattr(t, "softmax", False)):
                act = Activation.SOFTMAX
            elif _flag(getattr(t, "sigmoid", False)):
                act = Activation.SIGMOID
        elif isinstance(t, (AsDiscreted, AsDiscrete)):
            kw = t.converter.kwargs if isinstance(t, AsDiscreted) else t.kwargs
            argmax = argmax or _flag(getattr(t, "argmax", kw.get("argmax", False)))
            thr = getattr(t, "threshold", None)
            thr = thr[0] if isinstance(thr, (tuple, list)) else thr
            if isinstance(thr, (int, float)) and not isinstance(thr, bool):
                threshold = float(thr)
        elif isinstance(t, Invertd):
            invertd = True
    if act is None and argmax:
        act = Activation.SOFTMAX  # argmax of logits = argmax of their softmax
    return Postprocessing(act, threshold, argmax, invertd)


def segmentation_dtype(n_labels: int) -> np.dtype:
    """The smallest unsigned integer dtype holding labels ``0 .. n_labels`` (uint8 up to 255)."""
    return np.dtype(np.uint8) if n_labels <= 255 else np.dtype(np.uint16)


@runtime_checkable
class ModelCase(Protocol):
    """One case on the model's grid, as an adapter's :meth:`~FrameworkAdapter.load_case` returns it.

    Attributes:
        image: ``[C, *S]`` float32 on the model's (preprocessed) grid; a MONAI ``MetaTensor`` whose ``affine``
            maps its voxels to mm.
        paths: channel name -> the original file (plus ``"seg"`` for a label file).
        reference_path: the original file whose grid the outputs are written on.
        case_id: the case's id.
        channel_names: names of the C channels (BraTS modality names where they are ones).
        original_shape, original_affine: the reference file's grid (nibabel axis order, RAS affine).
    """

    image: Any
    paths: dict[str, Path]
    reference_path: Path
    case_id: str
    channel_names: tuple[str, ...]
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray

    def invert(self, volume: np.ndarray | torch.Tensor, *, nearest: bool = False) -> np.ndarray:
        """``[K, *S]`` (or ``[*S]``) on the model's grid -> float32 on the original grid (the framework's own way
        back: MONAI ``Invertd``, nnU-Net's export); ``nearest`` for masks."""
        ...


@runtime_checkable
class FrameworkAdapter(Protocol):
    """What the case pipeline needs from a framework (module docstring). Implementations must be picklable
    (a Ray worker unpickles the work once and calls :meth:`setup`)."""

    framework: Framework
    #: True when the plan loads weights of its own into :attr:`network` (nnU-Net's folds, ``PassPlan.folds``): a
    #: randomised copy of :attr:`network` cannot be explained (``medcam evaluate``'s sanity check)
    own_executor: bool

    @property
    def network(self) -> nn.Module:
        """The eager network the explainers hook (``[B, Cin, *S] -> [B, C, *S]`` logits)."""
        ...

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the C output channels (``()`` when unknown)."""
        ...

    @property
    def activation(self) -> Activation:
        """How the prediction is formed from the outputs."""
        ...

    def setup(self, device: str) -> FrameworkAdapter:
        """This adapter with its network on ``device`` (loaded there if it was pickled without it)."""
        ...

    def discover(self, inputs: Sequence[Any], case_id: str | None = None) -> list[Any]:
        """The :class:`~medcam.pipeline.CaseSource` list of the inputs (checked; files resolved once)."""
        ...

    def load_case(self, source: Any) -> ModelCase:
        """One case on the model's grid (the framework's own preprocessing)."""
        ...

    def targets(self, specs: Sequence[Any], case: ModelCase, source: Any, threshold: float | None) -> list[Any]:
        """One :class:`~medcam.targets.Target` per spec on the model's grid."""
        ...

    def predict(
        self, case: ModelCase, targets: Sequence[Any], *, inferer: Any, device: torch.device, amp: bool
    ) -> torch.Tensor | None:
        """The framework's prediction ``[1, C, *S]`` (float32), or None when the first explanation forms it (no
        target needs it first)."""
        ...

    def predict_image(
        self, case: ModelCase, image: torch.Tensor, *, inferer: Any, device: torch.device
    ) -> torch.Tensor:
        """The framework's own prediction of ``image`` ``[N, Cin, *S]``: images on ``case``'s (the model's) grid,
        e.g. perturbed copies of ``case.image`` (``medcam evaluate``'s faithfulness metrics) -> logits
        ``[N, C, *S]`` float32 on ``image.device``, no gradient. Run as :meth:`predict` runs the case (MONAI's
        inferer with the model's window settings, nnU-Net's predictor with its tiles, mirrors and folds), never a
        bare forward of a windowed framework's network."""
        ...

    def reference_regions(self, case: ModelCase, source: Any) -> torch.Tensor | None:
        """The case's reference label (its BraTS ``seg`` file) as region masks ``[3, *S]`` (TC, WT, ET; bool) on
        the model's grid, taken there as the framework's preprocessing takes the image; None without one."""
        ...

    def plan(self, case: ModelCase, *, inferer: Any, device: torch.device) -> PassPlan:
        """The pass plan of the framework's prediction of ``case`` (its image ``[1, Cin, *P]`` on the network's
        device; ``inferer``: the run's MONAI sliding window, for frameworks that use one)."""
        ...

    def segmentation(self, case: ModelCase, output: torch.Tensor, threshold: float | None) -> np.ndarray:
        """The predicted segmentation on the original grid in the framework's own dtype: integer labels for
        softmax/argmax models and nnU-Net, ``[C, *original]`` 0/1 uint8 region masks for sigmoid models."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """JSON-serialisable description for ``summary.json``'s ``model``."""
        ...


def explain(
    adapter: FrameworkAdapter,
    method: type,
    plan: PassPlan,
    targets: Sequence[Any],
    layer: str,
    *,
    output: torch.Tensor | None = None,
    amp: bool = False,
    progress: bool = False,
    graph_budget: int | None = None,
) -> CAMResult:
    """One method's explanation of an adapter's plan, the same for every framework: an explainer of ``method`` (a
    class of ``medcam.METHODS`` or a SyCAM class) on the adapter's network and ``layer``, with the adapter's output
    activation, run on ``plan`` by its own execution (:meth:`medcam.BaseSegCAM.explain_plan`).

    Args:
        output: the framework's prediction ``[1, C, *S]`` when known (spares the prediction a target needs).
        graph_budget: bytes of graphs kept while the explanation forms the prediction in its own pass
            (:mod:`medcam.kept_graphs`; None: half the free memory).

    Returns:
        :class:`~medcam.CAMResult`: maps ``[1, K, *S]`` on the model's grid (float32, on ``plan.device``),
        ``output`` = the prediction when known (nnU-Net's result always has it).
    """
    act = adapter.activation.value
    cam = method(
        adapter.network, layer=layer, amp=amp, output_activation=act, progress=progress, graph_budget=graph_budget
    )
    return cam.explain_plan(plan, list(targets), output=None if plan.single_pass else output)
