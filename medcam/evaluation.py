"""Evaluate CAM methods x layers x targets on a case (or a cohort) with :mod:`medcam.metrics`; write tables and plots.

:func:`evaluate` explains one case with every (method, layer) pair and scores each map with the selected metrics;
the result is a long table, one row per (case, method, layer, target, metric) with its value. :func:`write_results`
writes ``metrics.csv``, ``metrics.json`` and plots (deletion / insertion curves, threshold sweep) atomically
(temporary file in the same folder, then ``os.replace``), refusing to overwrite unless ``overwrite=True``.

Metric groups (``metrics=``):
- ``"localisation"`` (needs ``reference``): energy pointing game, pointing game, Dice / IoU / HD95 (mm) after the
  chosen threshold, and a threshold sweep (Dice vs fixed thresholds on min-max normalised maps).
- ``"deletion"`` / ``"insertion"``: curve AUCs on the explained (logit) ROI score, baseline ``baseline``.
- ``"average_drop"``: average drop (%) and increase in confidence on the probability ROI score.
- ``"road"``: ROAD MoRF / LeRF means and the combined score (slow: a sparse solve per percentile).
- ``"sanity"``: cascading randomisation; the Spearman / SSIM similarity after randomising all layers (step ``-1``)
  and the mean over steps (lower = the method depends on the weights, as it should). A constant ("dead") map has
  similarity 0 with a non-constant map and 1 with another constant map (convention of :mod:`medcam.metrics.sanity`);
  ``sanity_constant_steps`` counts the randomisation steps whose map was constant, and ``sanity_original_constant``
  is 1 when the trained model's own map is constant (then the sanity rows are uninformative).
With ``consensus=True`` and two methods or more, a MetaCAM-style consensus map ("metacam") is scored too.

The command line ``medcam evaluate`` (:mod:`medcam.cli`, through :func:`medcam.pipeline.evaluate.evaluate_files`) runs this on
BraTS case folders, image files or a cohort and writes the same files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import MedcamError
from .hooks import preserved_model_state
from .runner import ModelRunner
from .targets import Target, as_target_list

__all__ = [
    "EvaluationResult", "evaluate", "evaluate_cohort", "write_results", "check_outputs", "DEFAULT_METRICS",
    "ALL_METRICS",
]  # fmt: skip

logger = logging.getLogger(__name__)

ALL_METRICS = ("localisation", "deletion", "insertion", "average_drop", "road", "sanity")
DEFAULT_METRICS = ("localisation", "deletion", "insertion", "average_drop")


@dataclass
class EvaluationResult:
    """Rows of the long table and the curves behind the plots.

    Attributes:
        rows: dicts with keys ``case, method, layer, target, metric, value``.
        curves: ``(case, method, layer, target, mode) -> (fractions [T+1], scores [T+1])`` for deletion/insertion.
        sweeps: ``(case, method, layer, target) -> (thresholds [T], dice [T])``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[tuple, tuple[list[float], list[float]]] = field(default_factory=dict)
    sweeps: dict[tuple, tuple[list[float], list[float]]] = field(default_factory=dict)

    def extend(self, other: EvaluationResult) -> None:
        self.rows += other.rows
        self.curves.update(other.curves)
        self.sweeps.update(other.sweeps)

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
    from .methods import METHODS

    if isinstance(m, type):
        return m.__name__, m
    if m not in METHODS:
        raise MedcamError(f"unknown method {m!r}; choose from {sorted(METHODS)} or pass a BaseSegCAM subclass")
    return m, METHODS[m]


def _reference_for(reference: Any, tl: list[Target], spatial: tuple[int, ...]) -> list[torch.Tensor | None]:
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
    out = []
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


def evaluate(
    model: nn.Module,
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
    road_percentiles: Sequence[float] = (10, 30, 50, 70, 90),
    output_activation: str = "sigmoid",
    inferer: Any = None,
    consensus: bool = False,
    consensus_top_percent: float = 10.0,
    sanity_max_steps: int | None = None,
    case_id: str = "case",
    target_names: Sequence[str] | None = None,
) -> EvaluationResult:
    """Explain one case with every (method, layer) and score every target's map.

    Args:
        model: segmentation network ``[1, Cin, *S] -> [1, C, *S]`` (never modified).
        image: ``[1, Cin, *S]`` (or ``[Cin, *S]``).
        targets: :mod:`medcam.targets` objects (their ``name`` labels the rows).
        methods: names in ``medcam.METHODS`` (``gradcam``, ``hirescam``, ``xgradcam``, ``gradcam++``, ``layercam``)
            or explainer classes.
        layers: dotted layer names or ``"auto"``.
        reference: reference mask(s) ``G`` on the image grid: one tensor ``[*S]`` for all targets, a list (one per
            target) or a dict ``target.name -> mask``; needed for ``"localisation"``.
        spacing: voxel spacing in mm (HD95, pointing-game tolerance).
        metrics: subset of :data:`ALL_METRICS`.
        threshold: ``(method, value)`` for Dice / IoU / HD95: ``("otsu", None)``, ``("percentile", 90)``,
            ``("value", 0.5)`` on min-max normalised maps.
        steps, baseline, batch_size: deletion / insertion settings (see :func:`medcam.metrics.perturbation_curve`).
        road_percentiles: ROAD removal percentages.
        output_activation: ``"sigmoid"`` or ``"softmax"``: the probability score of the average drop.
        inferer: optional MONAI ``SlidingWindowInferer`` for explanation and scoring of whole volumes.
        consensus: also score a MetaCAM-style consensus of the methods (per layer and target).
        consensus_top_percent: top percentage of each method's map that votes in the consensus.
        sanity_max_steps: at most this many cascade steps get a map in the sanity check (evenly spaced, last
            included; see :func:`medcam.metrics.cascading_randomization`); None: one per parametrised layer.
        case_id: the ``case`` column.
        target_names: labels of the ``target`` column, one per target (default: each target's ``name``, e.g.
            ``predicted2``); must be distinct.
    Returns:
        :class:`EvaluationResult`.
    """
    from . import metrics as M

    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise MedcamError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
    if not methods or not layers:
        raise MedcamError("give at least one method and one layer")
    mcls = [_method_class(m) for m in methods]
    tl = as_target_list(targets)
    if target_names is None:
        tnames = [t.name for t in tl]
    else:
        tnames = [str(n) for n in target_names]
        if len(tnames) != len(tl):
            raise MedcamError(f"target_names has {len(tnames)} names for {len(tl)} targets; give one per target")
    if len(set(tnames)) != len(tnames):
        raise MedcamError(f"target names {tnames} are not distinct; pass distinct target_names=")
    if not isinstance(image, torch.Tensor):
        raise MedcamError(f"image must be a torch tensor [1, Cin, *S], got {type(image).__name__}")
    if image.ndim == 4:
        image = image[None]
    if image.ndim != 5 or image.shape[0] != 1:
        raise MedcamError(
            f"evaluate takes one 3D case [1, Cin, D, H, W], got {tuple(image.shape)}; loop with evaluate_cohort"
        )
    spatial = tuple(image.shape[2:])
    refs = _reference_for(reference, tl, spatial)
    if "localisation" in metrics and all(r is None for r in refs):
        raise MedcamError("metric 'localisation' needs reference=<mask on the image grid>; or drop it from metrics")
    if output_activation not in ("sigmoid", "softmax"):
        raise MedcamError(f"output_activation must be 'sigmoid' or 'softmax', got {output_activation!r}")
    thr_method, thr_value = threshold

    res = EvaluationResult()
    runner = ModelRunner(model)  # output selection as the explainers (a deep-supervision tuple gives element 0)

    def net(x: torch.Tensor) -> torch.Tensor:
        return runner.predictor(x) if inferer is None else inferer(x, runner.predictor)

    with preserved_model_state(model):
        with torch.no_grad():
            out = net(image)
        weights = [t.score_weights(out) for t in tl]
        logit_fns = [M.make_score_fn(net, w, batch_size) for w in weights]
        prob_fns = [M.make_score_fn(net, w, batch_size, activation=output_activation) for w in weights]

        def add(method: str, layer: str, target: str, metric: str, v: float) -> None:
            res.rows.append(dict(case=case_id, method=method, layer=layer, target=target, metric=metric, value=v))

        def score_map(method: str, layer: str, k: int, smap: torch.Tensor, map_fn: Callable | None) -> None:
            tname = tnames[k]
            key = (case_id, method, layer, tname)
            if "localisation" in metrics and refs[k] is not None:
                loc = M.localisation_scores(
                    smap[None], refs[k].to(smap.device)[None], thr_method, thr_value, "minmax", spacing, tolerance_mm
                )
                for name, v in loc.items():
                    add(method, layer, tname, name, _f(v))
                sw = M.threshold_sweep(smap[None], refs[k].to(smap.device)[None])
                res.sweeps[key] = (sw["thresholds"].tolist(), sw["dice"].reshape(-1).tolist())
            for mode in ("deletion", "insertion"):
                if mode in metrics:
                    c = M.perturbation_curve(
                        image[0],
                        smap,
                        logit_fns[k],
                        mode,
                        steps,
                        baseline,
                        batch_size,  # type: ignore[arg-type]
                    )
                    add(method, layer, tname, f"{mode}_auc", _f(c.auc))
                    res.curves[key + (mode,)] = (c.fractions.tolist(), c.scores[0].tolist())
            if "average_drop" in metrics:
                ad = M.average_drop_increase(image[0], smap, prob_fns[k])
                add(method, layer, tname, "average_drop_percent", _f(ad["drop_percent"]))
                add(method, layer, tname, "increase_in_confidence", _f(ad["increase"]))
            if "road" in metrics:
                r = M.road(image[0], smap, logit_fns[k], road_percentiles, batch_size=batch_size)
                add(method, layer, tname, "road_morf", float(r.morf.mean()))
                add(method, layer, tname, "road_lerf", float(r.lerf.mean()))
                add(method, layer, tname, "road_combined", _f(r.combined))
            if "sanity" in metrics and map_fn is not None:
                s = M.cascading_randomization(model, map_fn, max_steps=sanity_max_steps)
                for meas, v in s.similarity.items():
                    add(method, layer, tname, f"sanity_{meas}_final", _f(v[-1]))
                    add(method, layer, tname, f"sanity_{meas}_mean", float(v[1:].float().nanmean()))
                dead = s.constant.reshape(s.constant.shape[0], -1).any(1)
                add(method, layer, tname, "sanity_original_constant", float(dead[0]))
                add(method, layer, tname, "sanity_constant_steps", float(dead[1:].sum()))

        for layer in layers:
            per_method: list[torch.Tensor] = []
            for mname, cls in mcls:
                cam = cls(model, layer, inferer=inferer)
                maps = cam(image, tl)[0].detach().to(image.device)  # [K, *S] (an inferer may stitch elsewhere)
                lname = cam.layer_name or str(layer)
                per_method.append(maps)
                logger.info("evaluate: %s %s layer %s", case_id, mname, lname)
                for k in range(len(tl)):

                    def map_fn(m: nn.Module, cls=cls, lname=lname, k=k) -> torch.Tensor:
                        return cls(m, lname, inferer=inferer)(image, [tl[k]])[0, 0].to(image.device)

                    score_map(mname, lname, k, maps[k], map_fn)
            if consensus and len(per_method) >= 2:
                cons = M.consensus(torch.stack(per_method), consensus_top_percent)
                for k in range(len(tl)):
                    score_map("metacam", lname, k, cons.meta_map[k], None)
    return res


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


def _output_paths(out_dir: Path, plots: bool) -> dict[str, Path]:
    p = {"csv": out_dir / "metrics.csv", "json": out_dir / "metrics.json"}
    if plots:
        p["curves"] = out_dir / "deletion_insertion.png"
        p["sweep"] = out_dir / "threshold_sweep.png"
    return p


def check_outputs(out_dir: str | Path, overwrite: bool = False, plots: bool = True) -> dict[str, Path]:
    """Refuse existing outputs unless ``overwrite`` (call before the expensive evaluation)."""
    from .io.atomic import check_output_path

    paths = _output_paths(Path(out_dir), plots)
    for p in paths.values():
        check_output_path(p, overwrite)
    return paths


def write_results(
    result: EvaluationResult, out_dir: str | Path, overwrite: bool = False, plots: bool = True
) -> dict[str, Path]:
    """Write ``metrics.csv`` / ``metrics.json`` (+ ``deletion_insertion.png``, ``threshold_sweep.png``) atomically.

    Returns:
        the written paths by kind. Raises ``OutputExistsError`` (a ``FileExistsError``) if a file exists and
        ``overwrite`` is False, before anything is written.
    """
    import csv

    from .io.atomic import atomic_write

    paths = check_outputs(out_dir, overwrite, plots)
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
        Path(tmp).write_text(json.dumps({"columns": cols, "rows": rows}, indent=1))
    if plots:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (case, method, layer, target, mode), (x, y) in result.curves.items():
            ax = axes[0 if mode == "deletion" else 1]
            ax.plot(x, y, label=f"{case} {method} {layer} {target}")
        for ax, mode in zip(axes, ("deletion", "insertion")):
            what = "removed" if mode == "deletion" else "inserted"
            ax.set(title=f"{mode} curve", xlabel=f"fraction of voxels {what}", ylabel="ROI score")
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
