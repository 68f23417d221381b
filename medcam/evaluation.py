"""Evaluate CAM methods x layers x targets on a case (or a cohort) with :mod:`medcam.metrics`; write tables and plots.

:func:`evaluate` explains one case with every (method, layer) pair and scores each map with the selected metrics;
the result is a long table, one row per (case, method, layer, target, metric) with its value. :func:`write_results`
writes ``metrics.csv``, ``metrics.json`` and plots (deletion / insertion curves, threshold sweep) atomically
(temporary file in the same folder, then ``os.replace``), refusing to overwrite unless ``overwrite=True``.

Metric groups (``metrics=``):
- ``"localisation"`` (needs ``reference``): energy pointing game, pointing game, Dice / IoU / HD95 (mm) after the
  chosen threshold, and a threshold sweep (Dice vs fixed thresholds on min-max normalised maps). The HD95 row names
  its convention: ``hd95_monai_mm`` (default, max of the two directed 95th percentiles) or ``hd95_pooled_mm``
  (``hd95_convention="pooled"``: medpy's 95th percentile of the pooled distances).
- ``"deletion"``: ``deletion_auc``, curve AUC on the explained (logit) ROI score, substrate ``baseline``.
- ``"insertion"``: ``insertion_rise_auc`` (default, RISE's protocol: start from the blurred image, score the mean
  probability over the ROI, in [0, 1]) or ``insertion_baseline_auc`` (``insertion_protocol="baseline"``: start from
  ``baseline``, score the logits, the former definition).
- Deletion, insertion and ROAD break ties of the map at random and average over ``tie_draws`` draws; the row
  ``tied_fraction`` gives the fraction of the map's voxels that share their value with another voxel. A constant
  map (e.g. all zero) or an empty ROI gives NaN (with a warning) for these metrics.
- ``"average_drop"``: average drop (%) and increase in confidence on the probability ROI score.
- ``"road"``: ROAD MoRF / LeRF means and the combined score at the paper's 10, 20, ..., 90 % with Rong et al.'s
  imputation weights (slow: a sparse solve per percentile and tie draw).
- ``"sanity"``: cascading randomisation with every target frozen to the trained model's region (a ``MaskROI`` of
  the region the trained model's output gives it, :func:`medcam.metrics.freeze_targets`: a ``PredictedROI`` is not
  re-predicted by the randomised models, as in Adebayo et al., who keep the explained output fixed); the Spearman /
  SSIM similarity after randomising all layers (step ``-1``)
  and the mean over steps (lower = the method depends on the weights, as it should). A constant ("dead") map has
  similarity 0 with a non-constant map and 1 with another constant map (convention of :mod:`medcam.metrics.sanity`);
  ``sanity_constant_steps`` counts the randomisation steps whose map was constant, and ``sanity_original_constant``
  is 1 when the trained model's own map is constant (then the sanity rows are uninformative).
With ``consensus=True`` and two methods or more, a MetaCAM-style consensus map ("metacam") is scored too.
The conventions used are recorded in :attr:`EvaluationResult.settings` and written to ``metrics.json``.

The command line ``medcam evaluate`` (:mod:`medcam.cli`, through :func:`medcam.pipeline.evaluate.evaluate_files`) runs this on
BraTS case folders, image files or a cohort and writes the same files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import MedcamError
from .hooks import preserved_model_state
from .runner import ModelRunner
from .targets import Target, as_target_list
from .types import literal_value

if TYPE_CHECKING:
    from .metrics.faithfulness import Activation, Baseline, ScoreFunction
    from .metrics.localisation import HD95Convention
    from .metrics.thresholds import ThresholdMethod

__all__ = [
    "EvaluationResult", "EvaluationModel", "NetworkModel", "evaluate", "evaluate_cohort", "write_results",
    "check_outputs", "DEFAULT_METRICS", "ALL_METRICS",
]  # fmt: skip

logger = logging.getLogger(__name__)

ALL_METRICS = ("localisation", "deletion", "insertion", "average_drop", "road", "sanity")
DEFAULT_METRICS = ("localisation", "deletion", "insertion", "average_drop")
_CURVE_MODES: tuple[Literal["deletion", "insertion"], ...] = ("deletion", "insertion")


@dataclass
class EvaluationResult:
    """Rows of the long table and the curves behind the plots.

    Attributes:
        rows: dicts with keys ``case, method, layer, target, metric, value``.
        curves: ``(case, method, layer, target, mode) -> (fractions [T+1], scores [T+1])`` for deletion/insertion.
        sweeps: ``(case, method, layer, target) -> (thresholds [T], dice [T])``.
        settings: the metric conventions used (HD95 convention, insertion protocol, tie-breaking, ROAD percentiles,
            sanity-check target freezing), written to ``metrics.json``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[tuple, tuple[list[float], list[float]]] = field(default_factory=dict)
    sweeps: dict[tuple, tuple[list[float], list[float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def extend(self, other: EvaluationResult) -> None:
        self.rows += other.rows
        self.curves.update(other.curves)
        self.sweeps.update(other.sweeps)
        self.settings.update(other.settings)

    def value(self, method: str, layer: str, target: str, metric: str, case: str | None = None) -> float:
        """The value of one cell (raises KeyError if absent)."""
        for r in self.rows:
            if (r["method"], r["layer"], r["target"], r["metric"]) == (method, layer, target, metric) and (
                case is None or r["case"] == case
            ):
                return r["value"]
        raise KeyError((method, layer, target, metric, case))

    def to_dataframe(self):
        """The rows as a pandas DataFrame (pandas is an optional dependency)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["case", "method", "layer", "target", "metric", "value"])


def _method_class(m: str | type) -> tuple[str, type]:
    """``(row label, explainer class)``: a class, a name of ``medcam.METHODS`` or ``synth:FILE`` (a SyCAM expression
    saved by :meth:`medcam.SynthesizedCAM.save`, labelled ``synth-<file stem>``)."""
    from .methods import METHODS, resolve_method

    if isinstance(m, type):
        return m.__name__, m
    if m.startswith("synth:"):
        return resolve_method(m)
    if m not in METHODS:
        raise MedcamError(f"unknown method {m!r}; choose from {sorted(METHODS)} or pass a BaseSegCAM subclass")
    return m, METHODS[m]


def _method_classes(methods: Sequence[str | type], layers: Sequence[str]) -> list[tuple[str, type]]:
    """``(name, explainer class)`` of every method (at least one method and one layer are needed)."""
    if not methods or not layers:
        raise MedcamError("give at least one method and one layer")
    return [_method_class(m) for m in methods]


def _reference_for(
    reference: Any, tl: list[Target], spatial: tuple[int, ...], needed: bool = False
) -> list[torch.Tensor | None]:
    """One boolean reference mask ``[*S]`` (or None) per target; ``needed``: at least one is required."""
    refs = _reference_masks(reference, tl, spatial)
    if needed and all(r is None for r in refs):
        raise MedcamError("metric 'localisation' needs reference=<mask on the image grid>; or drop it from metrics")
    return refs


def _reference_masks(reference: Any, tl: list[Target], spatial: tuple[int, ...]) -> list[torch.Tensor | None]:
    if reference is None:
        return [None] * len(tl)
    if isinstance(reference, Mapping):
        refs = [reference.get(t.name) for t in tl]
    elif isinstance(reference, (list, tuple)):
        if len(reference) != len(tl):
            raise MedcamError(f"reference has {len(reference)} masks for {len(tl)} targets; give one per target")
        refs = list(reference)
    else:
        refs = [reference] * len(tl)
    out: list[torch.Tensor | None] = []
    for r in refs:
        if r is None:
            out.append(None)
            continue
        r = torch.as_tensor(r)
        r = r.reshape(r.shape[-len(spatial) :]) if r.numel() == math.prod(spatial) else r
        if tuple(r.shape) != spatial:
            raise MedcamError(f"reference mask {tuple(r.shape)} must have the image's spatial shape {spatial}")
        out.append(r > 0)
    return out


def _f(x: torch.Tensor | float) -> float:
    return float(x) if not isinstance(x, torch.Tensor) else float(x.detach().cpu().reshape(-1)[0])


def _baseline(value: str | float) -> Baseline:
    """The deletion substrate: ``"zero"``, ``"mean"``, ``"blur"`` or a number (MedcamError otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if value == "zero":
        return "zero"
    if value == "mean":
        return "mean"
    if value == "blur":
        return "blur"
    raise MedcamError(f"baseline must be 'zero', 'mean', 'blur' or a number, got {value!r}")


@dataclass(frozen=True)
class _MetricOptions:
    """The metric settings of one :func:`evaluate` call, checked and narrowed (see its arguments)."""

    metrics: tuple[str, ...]
    threshold_method: ThresholdMethod
    threshold_value: float | None
    spacing: Sequence[float] | float | None
    tolerance_mm: float
    steps: int
    baseline: Baseline
    batch_size: int
    road_percentiles: tuple[float, ...]
    output_activation: Activation
    sanity_max_steps: int | None
    insertion_protocol: str
    hd95_convention: HD95Convention
    tie_draws: int

    def wants(self, *groups: str) -> bool:
        """True if any of the metric groups is asked for."""
        return any(g in self.metrics for g in groups)

    def curve_kw(self) -> dict[str, Any]:
        """Keywords shared by the deletion and insertion curves."""
        return dict(steps=self.steps, batch_size=self.batch_size, tie_draws=self.tie_draws)

    def settings(self) -> dict[str, Any]:
        """The conventions recorded in :attr:`EvaluationResult.settings` (and ``metrics.json``)."""
        return {
            "hd95_convention": self.hd95_convention,
            "insertion_protocol": self.insertion_protocol,
            "deletion": f"substrate {self.baseline}, logit ROI score",
            "ties": f"random, mean of {self.tie_draws} draws",
            "road_percentiles": list(self.road_percentiles),
            "road_stencil": "rong",
            "sanity_targets": "frozen to the trained model's region (MaskROI)",
        }


def _metric_options(
    metrics: Sequence[str],
    *,
    threshold: tuple[str, float | None],
    spacing: Sequence[float] | float | None,
    tolerance_mm: float,
    steps: int,
    baseline: str | float,
    batch_size: int,
    road_percentiles: Sequence[float],
    output_activation: str,
    sanity_max_steps: int | None,
    insertion_protocol: str,
    hd95_convention: str,
    tie_draws: int,
) -> _MetricOptions:
    """Check the metric keywords of :func:`evaluate` (before any work) and narrow them to their literal types."""
    from .metrics.faithfulness import Activation
    from .metrics.localisation import HD95Convention
    from .metrics.thresholds import ThresholdMethod

    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise MedcamError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
    activation: Activation = literal_value(output_activation, Activation, "output_activation")
    if insertion_protocol not in ("rise", "baseline"):
        raise MedcamError(f"insertion_protocol must be 'rise' or 'baseline', got {insertion_protocol!r}")
    convention: HD95Convention = literal_value(hd95_convention, HD95Convention, "hd95_convention")
    if int(tie_draws) < 1:
        raise MedcamError(f"tie_draws must be >= 1, got {tie_draws}")
    thr_method, thr_value = threshold
    return _MetricOptions(
        metrics=tuple(metrics),
        threshold_method=literal_value(thr_method, ThresholdMethod, "threshold method"),
        threshold_value=thr_value,
        spacing=spacing,
        tolerance_mm=tolerance_mm,
        steps=steps,
        baseline=_baseline(baseline),
        batch_size=batch_size,
        road_percentiles=tuple(float(p) for p in road_percentiles),
        output_activation=activation,
        sanity_max_steps=sanity_max_steps,
        insertion_protocol=insertion_protocol,
        hd95_convention=convention,
        tie_draws=int(tie_draws),
    )


def _target_names(tl: list[Target], target_names: Sequence[str] | None) -> list[str]:
    """The ``target`` column: one distinct label per target (default each target's ``name``)."""
    if target_names is None:
        names = [t.name for t in tl]
    else:
        names = [str(n) for n in target_names]
        if len(names) != len(tl):
            raise MedcamError(f"target_names has {len(names)} names for {len(tl)} targets; give one per target")
    if len(set(names)) != len(names):
        raise MedcamError(f"target names {names} are not distinct; pass distinct target_names=")
    return names


def _one_case_image(image: Any) -> torch.Tensor:
    """``[1, Cin, D, H, W]`` (a ``[Cin, D, H, W]`` image gets its batch dim)."""
    if not isinstance(image, torch.Tensor):
        raise MedcamError(f"image must be a torch tensor [1, Cin, *S], got {type(image).__name__}")
    if image.ndim == 4:
        image = image[None]
    if image.ndim != 5 or image.shape[0] != 1:
        raise MedcamError(
            f"evaluate takes one 3D case [1, Cin, D, H, W], got {tuple(image.shape)}; loop with evaluate_cohort"
        )
    return image


@runtime_checkable
class EvaluationModel(Protocol):
    """How :func:`evaluate` runs a model on ONE case: its prediction of (perturbed) images and its explanation.

    :func:`evaluate` re-runs the model on perturbed copies of the case's image (deletion, insertion, average drop,
    ROAD) through :meth:`predict`, so a framework with a prediction of its own (MONAI's sliding-window inferer, a
    bundle's inferer settings, nnU-Net's predictor with its tiles, mirrors and folds) is scored on the prediction it
    makes, never on a bare ``network.forward``. :class:`NetworkModel` is an ``nn.Module`` with an optional MONAI
    inferer; the case pipeline wraps a framework adapter
    (:class:`medcam.pipeline.evaluate.AdapterModel`, :meth:`~medcam.frameworks.base.FrameworkAdapter.predict_image`).
    """

    @property
    def network(self) -> nn.Module:
        """The eager network (its modes and flags are preserved during :func:`evaluate`)."""
        ...

    @property
    def supports_sanity(self) -> bool:
        """Whether :meth:`randomised_map` can explain a randomised copy of :attr:`network` (the sanity check)."""
        ...

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, Cin, *S]`` (the case's image or perturbed copies of it) -> logits ``[N, C, *S]``, no gradient."""
        ...

    def explain(
        self, method: type, layer: str, image: torch.Tensor, targets: list[Target], output: torch.Tensor
    ) -> tuple[torch.Tensor, str]:
        """One method's maps ``[K, *S]`` of the case ``image [1, Cin, *S]`` at ``layer`` and the resolved layer
        name; ``output`` is :meth:`predict` of ``image`` (``[1, C, *S]``), which an explanation may reuse."""
        ...

    def randomised_map(
        self, method: type, layer: str, image: torch.Tensor, target: Target
    ) -> Callable[[nn.Module], torch.Tensor]:
        """``map_fn(network) -> [*S]``: the map of ``target`` explained on ``network``, a randomised copy of
        :attr:`network` (:func:`medcam.metrics.cascading_randomization`)."""
        ...


@dataclass
class NetworkModel:
    """An :class:`EvaluationModel` of an ``nn.Module`` ``[N, Cin, *S] -> [N, C, *S]`` run whole or through a MONAI
    ``inferer`` (``SlidingWindowInferer``), explained with medcam's executors; a deep-supervision tuple gives element
    0 (the explainers' output selection)."""

    model: nn.Module
    inferer: Any = None
    runner: ModelRunner = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.runner = ModelRunner(self.model)

    @property
    def network(self) -> nn.Module:
        return self.model

    @property
    def supports_sanity(self) -> bool:
        return True

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if self.inferer is None:
            return self.runner.predictor(images)
        return self.inferer(images, self.runner.predictor)

    def explain(
        self, method: type, layer: str, image: torch.Tensor, targets: list[Target], output: torch.Tensor
    ) -> tuple[torch.Tensor, str]:
        cam = method(self.model, layer, inferer=self.inferer)
        maps = cam(image, targets)[0]
        return maps, cam.layer_name or str(layer)

    def randomised_map(
        self, method: type, layer: str, image: torch.Tensor, target: Target
    ) -> Callable[[nn.Module], torch.Tensor]:
        return _FrozenTargetMap(method, layer, self.inferer, image, target)


@dataclass
class _FrozenTargetMap:
    """``map_fn(model) -> [*S]`` of the sanity check: one method's map of ``target`` (frozen to the trained model's
    region) on ``model``, a randomised copy of the trained one."""

    cls: type
    layer: str
    inferer: Any
    image: torch.Tensor
    target: Target

    def __call__(self, m: nn.Module) -> torch.Tensor:
        return self.cls(m, self.layer, inferer=self.inferer)(self.image, [self.target])[0, 0].to(self.image.device)


@dataclass
class _CaseScorer:
    """Scores the maps of one case with the selected metrics and appends the rows, curves and sweeps to ``result``.

    The score functions (logit sum, probability sum, mean probability over each target's ROI, each re-running the
    model's own prediction :meth:`EvaluationModel.predict`) and the frozen targets of the sanity check are built
    once from the trained model's output (:meth:`build`)."""

    model: EvaluationModel
    image: torch.Tensor
    output: torch.Tensor
    names: list[str]
    refs: list[torch.Tensor | None]
    opts: _MetricOptions
    case_id: str
    result: EvaluationResult
    logit_fns: list[ScoreFunction]
    prob_fns: list[ScoreFunction]
    mean_prob_fns: list[ScoreFunction]
    frozen: list[Target]

    @classmethod
    def build(
        cls,
        model: EvaluationModel,
        image: torch.Tensor,
        tl: list[Target],
        *,
        names: list[str],
        refs: list[torch.Tensor | None],
        opts: _MetricOptions,
        case_id: str,
        result: EvaluationResult,
    ) -> _CaseScorer:
        """Run the trained model once on ``image`` and make the score functions (no gradients)."""
        from .metrics import freeze_targets, make_score_fn

        net = model.predict
        with torch.no_grad():
            out = net(image)
        weights = [t.score_weights(out) for t in tl]
        bs, act = opts.batch_size, opts.output_activation
        return cls(
            model=model, image=image, output=out, names=names, refs=refs, opts=opts, case_id=case_id,
            result=result,
            logit_fns=[make_score_fn(net, w, bs) for w in weights],
            prob_fns=[make_score_fn(net, w, bs, activation=act) for w in weights],
            mean_prob_fns=[make_score_fn(net, w, bs, activation=act, reduction="mean") for w in weights],
            frozen=freeze_targets(tl, out),  # sanity check: the trained model's regions, fixed for the cascade
        )  # fmt: skip

    def add(self, key: tuple[str, str, str], metric: str, value: float) -> None:
        method, layer, target = key
        self.result.rows.append(
            dict(case=self.case_id, method=method, layer=layer, target=target, metric=metric, value=value)
        )

    def score(
        self, method: str, layer: str, k: int, smap: torch.Tensor, map_fn: Callable[[nn.Module], torch.Tensor] | None
    ) -> None:
        """All rows of target ``k``'s map ``smap [*S]`` (``map_fn``: its sanity-check map, None to skip it)."""
        key = (method, layer, self.names[k])
        if self.opts.wants("localisation") and self.refs[k] is not None:
            self.localisation(key, k, smap)
        if self.opts.wants("deletion", "insertion", "road"):
            from .metrics import tied_fraction

            self.add(key, "tied_fraction", _f(tied_fraction(smap[None])))
        for mode in _CURVE_MODES:
            if self.opts.wants(mode):
                self.curve(key, k, smap, mode)
        if self.opts.wants("average_drop"):
            self.average_drop(key, k, smap)
        if self.opts.wants("road"):
            self.road(key, k, smap)
        if self.opts.wants("sanity") and map_fn is not None:
            self.sanity(key, map_fn)

    def localisation(self, key: tuple[str, str, str], k: int, smap: torch.Tensor) -> None:
        """Pointing games, Dice / IoU / HD95 after the threshold, and the threshold sweep against ``refs[k]``."""
        from .metrics import localisation_scores, threshold_sweep

        ref = self.refs[k]
        assert ref is not None  # checked by the caller
        o = self.opts
        ref = ref.to(smap.device)[None]
        loc = localisation_scores(
            smap[None], ref, o.threshold_method, o.threshold_value, "minmax", o.spacing, o.tolerance_mm,
            hd95_convention=o.hd95_convention,
        )  # fmt: skip
        for name, v in loc.items():
            self.add(key, name, _f(v))
        sw = threshold_sweep(smap[None], ref)
        self.result.sweeps[(self.case_id, *key)] = (sw["thresholds"].tolist(), sw["dice"].reshape(-1).tolist())

    def curve(
        self, key: tuple[str, str, str], k: int, smap: torch.Tensor, mode: Literal["deletion", "insertion"]
    ) -> None:
        """The deletion or insertion AUC row and its curve."""
        from .metrics import insertion_curve, perturbation_curve

        image = self.image[0]
        if mode == "insertion" and self.opts.insertion_protocol == "rise":
            c = insertion_curve(image, smap, self.mean_prob_fns[k], protocol="rise", **self.opts.curve_kw())
            metric = "insertion_rise_auc"
        else:
            c = perturbation_curve(
                image, smap, self.logit_fns[k], mode, baseline=self.opts.baseline, protocol="baseline",
                **self.opts.curve_kw(),
            )  # fmt: skip
            metric = "deletion_auc" if mode == "deletion" else "insertion_baseline_auc"
        self.add(key, metric, _f(c.auc))
        self.result.curves[(self.case_id, *key, mode)] = (c.fractions.tolist(), c.scores[0].tolist())

    def average_drop(self, key: tuple[str, str, str], k: int, smap: torch.Tensor) -> None:
        from .metrics import average_drop_increase

        ad = average_drop_increase(self.image[0], smap, self.prob_fns[k])
        self.add(key, "average_drop_percent", _f(ad["drop_percent"]))
        self.add(key, "increase_in_confidence", _f(ad["increase"]))

    def road(self, key: tuple[str, str, str], k: int, smap: torch.Tensor) -> None:
        from .metrics import road

        o = self.opts
        r = road(self.image[0], smap, self.logit_fns[k], o.road_percentiles, batch_size=o.batch_size,
                 tie_draws=o.tie_draws)  # fmt: skip
        self.add(key, "road_morf", float(r.morf.mean()))
        self.add(key, "road_lerf", float(r.lerf.mean()))
        self.add(key, "road_combined", _f(r.combined))

    def sanity(self, key: tuple[str, str, str], map_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """Cascading randomisation: similarity after the last step and over all steps, constant-map counts."""
        from .metrics import cascading_randomization

        s = cascading_randomization(self.model.network, map_fn, max_steps=self.opts.sanity_max_steps)
        for meas, v in s.similarity.items():
            self.add(key, f"sanity_{meas}_final", _f(v[-1]))
            self.add(key, f"sanity_{meas}_mean", float(v[1:].float().nanmean()))
        if s.constant is not None:  # always set by cascading_randomization
            dead = s.constant.reshape(s.constant.shape[0], -1).any(1)
            self.add(key, "sanity_original_constant", float(dead[0]))
            self.add(key, "sanity_constant_steps", float(dead[1:].sum()))


def _evaluate_layer(
    scorer: _CaseScorer,
    layer: str,
    method_classes: list[tuple[str, type]],
    targets: list[Target],
    consensus_top_percent: float | None,
) -> None:
    """Explain the case with every method at ``layer`` and score each target's map (and the consensus map of the
    methods when ``consensus_top_percent`` is given and there are two methods or more)."""
    image, em = scorer.image, scorer.model
    per_method: list[torch.Tensor] = []
    lname = str(layer)
    for mname, cls in method_classes:
        maps, lname = em.explain(cls, layer, image, targets, scorer.output)
        maps = maps.detach().to(image.device)  # [K, *S] (an inferer may stitch elsewhere)
        per_method.append(maps)
        logger.info("evaluate: %s %s layer %s", scorer.case_id, mname, lname)
        for k in range(len(targets)):
            map_fn = em.randomised_map(cls, lname, image, scorer.frozen[k]) if scorer.opts.wants("sanity") else None
            scorer.score(mname, lname, k, maps[k], map_fn)
    if consensus_top_percent is not None and len(per_method) >= 2:
        from .metrics import consensus

        cons = consensus(torch.stack(per_method), consensus_top_percent)
        for k in range(len(targets)):
            scorer.score("metacam", lname, k, cons.meta_map[k], None)


def _progress(layers: Sequence[str], desc: str, on: bool) -> Iterator[str]:
    """The layers, with a tqdm bar (stderr) naming the one in progress when ``on``."""
    from tqdm.auto import tqdm

    bar = tqdm(layers, desc=desc, unit="layer", disable=not on, leave=False)
    for layer in bar:
        bar.set_postfix_str(str(layer))
        yield layer


def evaluate(
    model: nn.Module | EvaluationModel,
    image: torch.Tensor,
    targets: Target | Sequence[Target],
    methods: Sequence[str | type] = ("gradcam", "hirescam"),
    layers: Sequence[str] = ("auto",),
    reference: Any = None,
    spacing: Sequence[float] | float | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    threshold: tuple[str, float | None] = ("otsu", None),
    tolerance_mm: float = 0.0,
    steps: int = 20,
    baseline: str | float = "zero",
    batch_size: int = 4,
    road_percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    output_activation: str = "sigmoid",
    inferer: Any = None,
    consensus: bool = False,
    consensus_top_percent: float = 10.0,
    sanity_max_steps: int | None = None,
    case_id: str = "case",
    target_names: Sequence[str] | None = None,
    insertion_protocol: str = "rise",
    hd95_convention: str = "monai",
    tie_draws: int = 3,
    progress: bool = False,
) -> EvaluationResult:
    """Explain one case with every (method, layer) and score every target's map.

    Args:
        model: segmentation network ``[1, Cin, *S] -> [1, C, *S]`` (never modified), run whole or through
            ``inferer``; or an :class:`EvaluationModel` (a framework's own prediction and explanation of this case,
            e.g. the case pipeline's :class:`~medcam.pipeline.evaluate.AdapterModel`; ``inferer`` must be None).
        image: ``[1, Cin, *S]`` (or ``[Cin, *S]``).
        targets: :mod:`medcam.targets` objects (their ``name`` labels the rows).
        methods: names in ``medcam.METHODS`` (``gradcam``, ``hirescam``, ``xgradcam``, ``gradcam++``, ``layercam``),
            ``synth:FILE`` (a saved SyCAM expression; rows labelled ``synth-<file stem>``) or explainer classes.
        layers: dotted layer names or ``"auto"``.
        reference: reference mask(s) ``G`` on the image grid: one tensor ``[*S]`` for all targets, a list (one per
            target) or a dict ``target.name -> mask``; needed for ``"localisation"``.
        spacing: voxel spacing in mm (HD95, pointing-game tolerance).
        metrics: subset of :data:`ALL_METRICS`.
        threshold: ``(method, value)`` for Dice / IoU / HD95: ``("otsu", None)``, ``("percentile", 90)``,
            ``("value", 0.5)`` on min-max normalised maps.
        steps, baseline, batch_size: deletion / insertion settings (see :func:`medcam.metrics.perturbation_curve`);
            ``baseline`` is the deletion substrate (and the insertion start with ``insertion_protocol="baseline"``).
        road_percentiles: ROAD removal percentages (default the paper's 10, 20, ..., 90).
        output_activation: ``"sigmoid"`` or ``"softmax"``: the probability of average drop and RISE's insertion;
            ``"none"``: the network ends in its own sigmoid/softmax, outputs are scored as they are (logit rows too).
        inferer: optional MONAI ``SlidingWindowInferer`` for explanation and scoring of whole volumes.
        consensus: also score a MetaCAM-style consensus of the methods (per layer and target).
        consensus_top_percent: top percentage of each method's map that votes in the consensus.
        sanity_max_steps: at most this many cascade steps get a map in the sanity check (evenly spaced, last
            included; see :func:`medcam.metrics.cascading_randomization`); None: one per parametrised layer.
        case_id: the ``case`` column.
        target_names: labels of the ``target`` column, one per target (default: each target's ``name``, e.g.
            ``predicted2``); must be distinct.
        insertion_protocol: ``"rise"`` (blurred start, mean ROI probability; row ``insertion_rise_auc``) or
            ``"baseline"`` (start from ``baseline``, logits; row ``insertion_baseline_auc``).
        hd95_convention: ``"monai"`` (row ``hd95_monai_mm``) or ``"pooled"`` (medpy; row ``hd95_pooled_mm``).
        tie_draws: random tie-breaking draws averaged by deletion, insertion and ROAD. progress: a bar over the layers.
    Returns:
        :class:`EvaluationResult`.
    """
    opts = _metric_options(
        metrics, threshold=threshold, spacing=spacing, tolerance_mm=tolerance_mm, steps=steps, baseline=baseline,
        batch_size=batch_size, road_percentiles=road_percentiles, output_activation=output_activation, tie_draws=tie_draws,
        sanity_max_steps=sanity_max_steps, insertion_protocol=insertion_protocol, hd95_convention=hd95_convention,
    )  # fmt: skip
    method_classes = _method_classes(methods, layers)
    tl = as_target_list(targets)
    names = _target_names(tl, target_names)
    image = _one_case_image(image)
    refs = _reference_for(reference, tl, tuple(image.shape[2:]), needed="localisation" in opts.metrics)
    em = _evaluation_model(model, inferer, opts)
    result = EvaluationResult(settings=opts.settings())
    with preserved_model_state(em.network):
        scorer = _CaseScorer.build(em, image, tl, names=names, refs=refs, opts=opts, case_id=case_id, result=result)
        for layer in _progress(layers, f"evaluate {case_id}", progress):
            _evaluate_layer(scorer, layer, method_classes, tl, consensus_top_percent if consensus else None)
    return result


def _evaluation_model(model: nn.Module | EvaluationModel, inferer: Any, opts: _MetricOptions) -> EvaluationModel:
    """``model`` as an :class:`EvaluationModel`, checked against the metrics before any work."""
    if isinstance(model, nn.Module):
        return NetworkModel(model, inferer)
    if not isinstance(model, EvaluationModel):
        raise MedcamError(f"model must be an nn.Module or an EvaluationModel, got {type(model).__name__}")
    if inferer is not None:
        raise MedcamError("an EvaluationModel runs its own prediction: pass inferer=None")
    if opts.wants("sanity") and not model.supports_sanity:
        raise MedcamError(
            "metric 'sanity' randomises the network's weights, which this model's own explanation does not use "
            f"({type(model).__name__}); drop 'sanity' from metrics"
        )
    return model


def evaluate_cohort(
    model: nn.Module,
    cases: Sequence[tuple[str, torch.Tensor, Any]],
    targets: Target | Sequence[Target],
    **kwargs: Any,
) -> EvaluationResult:
    """:func:`evaluate` over ``cases`` = ``[(case_id, image [1, Cin, *S], reference or None), ...]``; rows are
    concatenated (average a metric over cases with e.g. ``df.groupby([...]).value.mean()``)."""
    if not cases:
        raise MedcamError("evaluate_cohort needs at least one (case_id, image, reference) tuple")
    total = EvaluationResult()
    for case_id, image, ref in cases:
        total.extend(evaluate(model, image, targets, reference=ref, case_id=str(case_id), **kwargs))
    return total


def _output_paths(out_dir: Path, plots: bool, suffix: str = "") -> dict[str, Path]:
    p = {"csv": out_dir / f"metrics{suffix}.csv", "json": out_dir / f"metrics{suffix}.json"}
    if plots:
        p["curves"] = out_dir / f"deletion_insertion{suffix}.png"
        p["sweep"] = out_dir / f"threshold_sweep{suffix}.png"
    return p


def check_outputs(
    out_dir: str | Path, overwrite: bool = False, plots: bool = True, *, suffix: str = ""
) -> dict[str, Path]:
    """Refuse existing outputs unless ``overwrite`` (call before the expensive evaluation).

    ``suffix``: added to every file name's stem, e.g. ``".part0-of-2"`` for one part of a split run."""
    from .io.atomic import check_output_path

    paths = _output_paths(Path(out_dir), plots, suffix)
    for p in paths.values():
        check_output_path(p, overwrite)
    return paths


def write_results(
    result: EvaluationResult, out_dir: str | Path, overwrite: bool = False, plots: bool = True, *, suffix: str = ""
) -> dict[str, Path]:
    """Write ``metrics.csv`` / ``metrics.json`` (+ ``deletion_insertion.png``, ``threshold_sweep.png``) atomically.

    ``suffix``: added to every file name's stem (``metrics.part0-of-2.csv`` for ``".part0-of-2"``).

    Returns:
        the written paths by kind. Raises ``OutputExistsError`` (a ``FileExistsError``) if a file exists and
        ``overwrite`` is False, before anything is written.
    """
    import csv

    from .io.atomic import atomic_write

    paths = check_outputs(out_dir, overwrite, plots, suffix=suffix)
    cols = ["case", "method", "layer", "target", "metric", "value"]
    with atomic_write(paths["csv"], overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(result.rows)
    with atomic_write(paths["json"], overwrite) as tmp:
        rows = [
            {**r, "value": None if isinstance(r["value"], float) and math.isnan(r["value"]) else r["value"]}
            for r in result.rows
        ]
        Path(tmp).write_text(json.dumps({"columns": cols, "settings": result.settings, "rows": rows}, indent=1))
    if plots:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        # one panel per curve kind that was computed (no empty insertion panel when only deletion ran)
        modes = [m for m in ("deletion", "insertion") if any(k[-1] == m for k in result.curves)] or ["deletion"]
        fig, grid = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        axes = list(grid[0])
        for (case, method, layer, target, mode), (x, y) in result.curves.items():
            ax = axes[modes.index(mode)]
            ax.plot(x, y, label=f"{case} {method} {layer} {target}")
        for ax, mode in zip(axes, modes):
            what = "removed" if mode == "deletion" else "inserted"
            proto = result.settings.get(f"{mode}_protocol")
            title = f"{mode} curve" + (f" ({proto} protocol)" if proto else "")
            ylabel = "mean ROI probability" if proto == "rise" else "ROI score"
            ax.set(title=title, xlabel=f"fraction of voxels {what}", ylabel=ylabel)
        for ax in axes:
            if ax.get_lines():
                ax.legend(fontsize=6)
        with atomic_write(paths["curves"], overwrite) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 4))
        for (case, method, layer, target), (t, d) in result.sweeps.items():
            ax.plot(t, d, marker=".", label=f"{case} {method} {layer} {target}")
        ax.set(title="threshold sweep", xlabel="threshold on min-max normalised map", ylabel="Dice")
        if result.sweeps:
            ax.legend(fontsize=6)
        with atomic_write(paths["sweep"], overwrite) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
