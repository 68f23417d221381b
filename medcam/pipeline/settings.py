"""One settings object for ``medcam explain`` and ``medcam evaluate``, and everything checked before the first case.

The command line maps its options onto :class:`RunSettings` (the options shared by both commands are declared once,
in :mod:`medcam.cli`); :func:`prepare` checks them all (methods, inputs, parts, model, targets, layers, window
settings) before any case is explained, so bad input fails fast with one message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cases import CaseSource, discover_cases, split_parts
from .errors import PipelineError
from .models import LoadedModel, load_model
from .numerics import check_threads, numerics_settings
from .target_specs import TargetSpec, default_targets, parse_targets

logger = logging.getLogger(__package__)

__all__ = [
    "RunSettings",
    "Prepared",
    "prepare",
    "make_inferer",
    "sliding_settings",
    "resolve_device",
    "SLIDING_DEFAULTS",
]

#: sliding-window settings used when neither the command line nor the model (a bundle's inferer) gives them
SLIDING_DEFAULTS: dict[str, Any] = {"overlap": 0.25, "sw_batch_size": 1, "mode": "constant"}


def sliding_settings(model_settings: dict[str, Any], **given: Any) -> dict[str, Any]:
    """``overlap``/``sw_batch_size``/``mode``: what was given (not None), else the model's, else the defaults."""
    out = {**SLIDING_DEFAULTS, **model_settings}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def make_inferer(
    roi_size: Sequence[int] | None,
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "constant",
    progress: bool = False,
) -> Any:
    """A MONAI ``SlidingWindowInferer`` (or None for whole-image explanation when ``roi_size`` is None/empty)."""
    if not roi_size:
        return None
    from monai.inferers import SlidingWindowInferer

    if any(int(s) < 1 for s in roi_size):
        raise PipelineError(f"roi size must be positive integers, got {tuple(roi_size)}")
    if not 0 <= overlap < 1:
        raise PipelineError(f"overlap must be in [0, 1), got {overlap}")
    if int(sw_batch_size) < 1:
        raise PipelineError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in ("constant", "gaussian"):
        raise PipelineError(f"blend mode must be 'constant' or 'gaussian', got {mode!r}")
    return SlidingWindowInferer(
        tuple(int(s) for s in roi_size),
        sw_batch_size=int(sw_batch_size),
        overlap=float(overlap),
        mode=mode,
        progress=progress,
    )


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; other names are checked (PipelineError if unusable)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


@dataclass
class RunSettings:
    """What to explain with what model, preprocessed and windowed how.

    Attributes:
        model_spec, checkpoint: see :func:`~medcam.pipeline.load_model`.
        methods: names in :data:`medcam.METHODS`, or ``synth:FILE`` for ``explain`` (empty: the command's default).
        targets: target specs (``ET``, ``WT:class``, ``mask:FILE``...; empty: each named output's predicted region).
        layers: dotted names or ``"auto"`` (empty: the model's default); ``explain`` takes one.
        regions, activation, channel_order: the model's output names, output activation and input modality order.
        threshold: probability threshold of predicted regions (None: 0.5 sigmoid, argmax softmax).
        preprocessing: overrides of the model's preprocessing (``spacing``, ``orientation``, ``crop_foreground``,
            ``normalize``, ``divisible_by``).
        roi_size: sliding-window size; ``()`` = whole image; None = the model's.
        overlap, sw_batch_size, blend: window settings (None: a bundle's inferer, else the defaults).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        amp: autocast (bf16 on CPU).
        graph_budget: bytes of autograd graphs kept while the first explanation forms the prediction in its own
            pass (None: half the free memory; 0: none kept, recomputed); see :mod:`medcam.kept_graphs`.
        threads: torch intra-op threads of every case, wherever it runs (None: 1, see :mod:`medcam.pipeline.numerics`).
        overwrite: redo finished cases / replace outputs.
        progress: tqdm bars.
        case_id: the case id (output sub-folder) when the inputs form one case (None: from the folder/file names).
        folds, checkpoint_name, use_mirroring: nnU-Net models (``model_spec`` ``nnunet:FOLDER``): folds,
            checkpoint file, test-time mirroring.
    """

    model_spec: str = "demo"
    checkpoint: str | None = None
    methods: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    regions: list[str] | None = None
    activation: str | None = None
    channel_order: list[str] | None = None
    threshold: float | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    roi_size: tuple[int, ...] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    blend: str | None = None
    device: str = "auto"
    amp: bool = False
    graph_budget: int | None = None
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    case_id: str | None = None
    folds: tuple[int | str, ...] = (0,)
    checkpoint_name: str = "checkpoint_final.pth"
    use_mirroring: bool = True


@dataclass
class Prepared:
    """The checked inputs of a run: cases, loaded model, targets, layers, inferer and the recorded settings."""

    cases: list[CaseSource]
    model: LoadedModel
    methods: list[str]
    specs: list[TargetSpec]
    layers: list[str]
    inferer: Any
    sliding: dict[str, Any] | None  # roi_size + window settings, or None for whole-image
    device: str

    def record(self, settings: RunSettings) -> dict[str, Any]:
        """The settings recorded in summaries and compared on resume."""
        return {
            "model": self.model.describe(),
            "methods": self.methods,
            "targets": [s.text for s in self.specs],
            "layer": self.layers[0] if len(self.layers) == 1 else self.layers,
            "sliding_window": self.sliding,
            "threshold": settings.threshold,
            "amp": settings.amp,
            "graph_budget": settings.graph_budget,
            "numerics": numerics_settings(settings.threads),
        }


def _methods(names: Sequence[str], default: Sequence[str], allow_synth: bool = False) -> list[str]:
    """Method names, lower-cased and unique; ``synth:FILE`` (kept as given) when ``allow_synth``: its expression
    file is read here, so a missing or bad one fails before any work."""
    from ..methods import METHODS, resolve_method

    def synth(m: str) -> bool:
        return allow_synth and m.startswith("synth:")

    out = list(dict.fromkeys(m if synth(m) else m.lower() for m in names)) or list(default)
    unknown = [m for m in out if m not in METHODS and not synth(m)]
    if unknown:
        more = " or synth:FILE" if allow_synth else ""
        raise PipelineError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}{more}")
    for m in out:
        if synth(m):
            resolve_method(m)  # MedcamError for a missing or bad expression file
    return out


def _check_layers(model: LoadedModel, layers: Sequence[str], device: str = "cpu") -> list[str]:
    """Unknown layers and layers that run more than once per forward fail here, before any case is loaded.

    The second check runs one no-grad forward of a zero input of the window size (at most 96 per axis; 64^3 without
    a window); a network that cannot run on it is left to the per-case checks."""
    from ..errors import ModelError
    from ..layers import check_layer_runs_once, resolve_layer

    out = list(dict.fromkeys(layers)) or [model.default_layer]
    named = [name for name in out if name != "auto"]
    for name in named:
        resolve_layer(model.net, name)
    if not named or model.in_channels is None:
        return out
    size = tuple(min(int(v), 96) for v in (model.roi_size or (64, 64, 64)))  # 96: divisible by strides <= 32
    example = torch.zeros((1, model.in_channels, *size), device=device)
    for name in named:
        try:
            check_layer_runs_once(model.net.to(device), name, example)
        except ModelError as e:
            logger.debug("layer check skipped: the network does not run on %s (%s)", tuple(example.shape), e)
            break
    return out


def _check_channel_order(channel_order: Sequence[str] | None, cases: Sequence[CaseSource]) -> None:
    """``--channel-order`` must permute the four BraTS modalities when a case is a BraTS folder or mapping: checked
    here, before the model is loaded and any case is read or compared with an existing case folder."""
    if not channel_order or not any(c.kind in ("brats_folder", "brats_mapping") for c in cases):
        return
    from ..data.brats import _channel_order
    from ..data.loading import MedcamDataError

    try:
        _channel_order(channel_order)
    except MedcamDataError as e:
        raise PipelineError(f"--channel-order {','.join(channel_order)}: {e}") from None


def prepare(
    inputs: Sequence[str],
    settings: RunSettings,
    *,
    default_methods: Sequence[str] = ("hirescam",),
    num_parts: int = 1,
    part_id: int = 0,
    allow_synth: bool = False,
) -> Prepared:
    """Check everything that can be checked before the first case; load the model once.

    ``allow_synth``: also accept ``synth:FILE`` methods (SyCAM expressions; ``explain`` and ``evaluate``)."""
    s = settings
    check_threads(s.threads)
    methods = _methods(s.methods, default_methods, allow_synth)
    if s.threshold is not None and not 0 < s.threshold < 1:
        raise PipelineError(f"--threshold must be a probability in (0, 1), got {s.threshold}")
    device = resolve_device(s.device)
    # a model that finds its own cases (nnU-Net's input layout) is loaded first; others after the inputs are checked
    own_cases = str(s.model_spec).startswith("nnunet:")
    if own_cases and s.amp:
        raise PipelineError("--amp does not apply to nnU-Net models: the predictor's own precision is used")
    cases = [] if own_cases else discover_cases(list(inputs), case_id=s.case_id)
    split_parts(cases, num_parts, part_id)
    _check_channel_order(s.channel_order, cases)
    model = load_model(
        s.model_spec,
        checkpoint=s.checkpoint,
        device=device,
        regions=s.regions,
        activation=s.activation,
        channel_order=s.channel_order,
        preprocessing=s.preprocessing or None,
        roi_size=s.roi_size,
        folds=s.folds,
        checkpoint_name=s.checkpoint_name,
        use_mirroring=s.use_mirroring,
    )
    if own_cases:
        cases = model.adapter.discover(list(inputs), s.case_id)
        split_parts(cases, num_parts, part_id)
    specs = parse_targets(s.targets, model.regions) if s.targets else default_targets(model.regions)
    layers = _check_layers(model, s.layers, device)
    sw = sliding_settings(model.sliding, overlap=s.overlap, sw_batch_size=s.sw_batch_size, mode=s.blend)
    inferer = make_inferer(model.roi_size, **sw, progress=False)
    sliding = None if inferer is None else {"roi_size": list(model.roi_size or ()), **sw}
    return Prepared(cases, model, methods, specs, layers, inferer, sliding, device)
