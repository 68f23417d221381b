"""What ``medcam evaluate`` does: score CAM methods x layers x targets on cases with :mod:`medcam.metrics`.

It shares ``medcam explain``'s machinery: the same :class:`~medcam.pipeline.RunSettings` (model, preprocessing,
windows), the same checks before the first case (:func:`~medcam.pipeline.prepare`) and the same cohort loop
(:func:`~medcam.pipeline.run_cohort`: resume, staged case folders, failure records). Each case is scored by
:func:`medcam.evaluation.evaluate` and its rows kept in a journal, ``OUT/.medcam-journal/cases/<case_id>/summary.json``
(with the run's ``cohort_summary.json``); the tables of all cases (``metrics.csv``, ``metrics.json``, plots) are then
written by :func:`medcam.evaluation.write_results` (atomic; existing files are refused unless ``overwrite``) and the
journal removed. A run interrupted before the tables resumes from the journal. The cases can run on another executor
(``executor="ray"``: Ray workers, see :mod:`medcam.pipeline.executors`); the tables are gathered in cohort order
either way. One part of a split run (``num_parts``/``part_id``, as ``medcam explain``) names its tables and its
journal with the suffix :func:`part_suffix` (``metrics.part0-of-2.csv``, ``.medcam-journal.part0-of-2/``), so the
parts can run at once into one output folder.
"""

from __future__ import annotations

import copy
import itertools
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import MedcamError
from ..geometry import spacing_of
from ..types import PathLike
from .cases import CaseSource, load_case
from .cohort import read_summary, run_cohort
from .errors import PipelineError
from .executors import Executor
from .settings import Prepared, RunSettings, prepare
from .target_specs import TargetSpec, case_specs, parse_target

__all__ = [
    "AdapterModel",
    "EvaluationOptions",
    "EvaluateWork",
    "evaluate_files",
    "parse_metrics",
    "parse_map_threshold",
    "parse_baseline",
    "part_suffix",
]

logger = logging.getLogger(__package__)

#: hidden folder of per-case results while an evaluation runs (removed once the tables are written)
JOURNAL = ".medcam-journal"


def parse_metrics(values: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """Metric group names (``all``, ``default`` allowed) -> (metric groups, whether ``localisation`` was named
    explicitly; through ``all`` / ``default`` it is dropped for cases without reference)."""
    from ..evaluation import ALL_METRICS, DEFAULT_METRICS

    names = [v.lower() for v in values]
    if not names:
        return tuple(DEFAULT_METRICS), False
    out: list[str] = []
    for n in names:
        group = ALL_METRICS if n == "all" else DEFAULT_METRICS if n == "default" else (n,)
        for g in group:
            if g not in ALL_METRICS:
                raise PipelineError(f"unknown metric {n!r}; choose from {', '.join(ALL_METRICS)}, default or all")
            if g not in out:
                out.append(g)
    return tuple(out), "localisation" in names


def parse_map_threshold(text: str) -> tuple[str, float | None]:
    """``otsu`` | ``percentile:Q`` | ``value:V`` -> the ``threshold=`` of :func:`medcam.evaluation.evaluate`."""
    t = text.strip().lower()
    if t == "otsu":
        return "otsu", None
    kind, _, num = t.partition(":")
    try:
        val: float | None = float(num)
    except ValueError:
        val = None
    if kind == "percentile" and val is not None and 0 <= val <= 100:
        return "percentile", val
    if kind == "value" and val is not None and 0 <= val <= 1:
        return "value", val
    raise PipelineError(f"--map-threshold must be otsu, percentile:Q (0-100) or value:V (0-1), got {text!r}")


def parse_baseline(text: str) -> str | float:
    """``zero`` | ``mean`` | ``blur`` | a number: the deletion substrate (and the insertion start with
    ``insertion_protocol="baseline"``)."""
    t = text.strip().lower()
    if t in ("zero", "mean", "blur"):
        return t
    try:
        return float(t)
    except ValueError:
        raise PipelineError(f"--baseline must be zero, mean, blur or a number, got {text!r}") from None


@dataclass
class EvaluationOptions:
    """The options of ``medcam evaluate`` beyond :class:`RunSettings` (see :func:`medcam.evaluation.evaluate`)."""

    reference: str = "auto"
    metrics: tuple[str, ...] = ()
    steps: int = 20
    baseline: str = "zero"
    map_threshold: str = "otsu"
    tolerance_mm: float = 0.0
    road_percentiles: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    batch_size: int = 4
    consensus: bool = False
    sanity_steps: int = 6
    plots: bool = True
    hd95_convention: str = "monai"
    insertion_protocol: str = "rise"
    tie_draws: int = 3

    def checked(self) -> dict[str, Any]:
        """The options as :func:`medcam.evaluation.evaluate` keywords (PipelineError on bad values)."""
        if self.hd95_convention not in ("monai", "pooled"):
            raise PipelineError(f"--hd95-convention must be monai or pooled, got {self.hd95_convention!r}")
        if self.insertion_protocol not in ("rise", "baseline"):
            raise PipelineError(f"--insertion-protocol must be rise or baseline, got {self.insertion_protocol!r}")
        for name in ("steps", "sanity_steps", "batch_size", "tie_draws"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.road_percentiles or not all(0 < p < 100 for p in self.road_percentiles):
            raise PipelineError(f"--road-percentiles must lie in (0, 100), got {list(self.road_percentiles)}")
        return {
            "threshold": parse_map_threshold(self.map_threshold),
            "tolerance_mm": self.tolerance_mm,
            "steps": self.steps,
            "baseline": parse_baseline(self.baseline),
            "batch_size": self.batch_size,
            "road_percentiles": tuple(self.road_percentiles),
            "consensus": self.consensus,
            "sanity_max_steps": self.sanity_steps,
            "hd95_convention": self.hd95_convention,
            "insertion_protocol": self.insertion_protocol,
            "tie_draws": self.tie_draws,
        }


def _check_reference(spec: str) -> str:
    """``auto`` | ``none`` | a BraTS region | ``mask:FILE`` (the file must exist): checked before the first case."""
    from ..data.brats import REGIONS

    mode = spec.strip()
    if mode.lower() in ("auto", "none") or mode.upper() in REGIONS:
        return mode
    path = mode[5:] if mode.lower().startswith("mask:") else mode
    if "{" in path:  # a per-case template, as for --target mask:{folder}/...: its placeholders are checked here
        try:
            parse_target(f"mask:{path}", ["reference"])
        except MedcamError as e:
            raise PipelineError(str(e).replace("--target", "--reference", 1)) from None
        return f"mask:{path}"
    if not path or not Path(path).is_file():
        raise PipelineError(
            f"--reference {spec!r}: expected auto, none, TC/WT/ET or mask:FILE "
            f"(a mask on the original image grid; per case: mask:{{folder}}/NAME.nii.gz)"
            f"{'' if not path else f'; file {path!r} not found'}"
        )
    return f"mask:{path}"


def _reference_masks(
    mode: str, case: Any, specs: Sequence[TargetSpec], source: CaseSource | None, adapter: Any
) -> list[torch.Tensor | None]:
    """One reference mask (bool tensor on the model's grid) or None per target spec, taken there by the model's
    ``adapter`` as it takes the case (its label: :meth:`~medcam.frameworks.base.FrameworkAdapter.reference_regions`;
    a ``mask:`` file: :meth:`~medcam.frameworks.base.FrameworkAdapter.targets`); a ``mask:`` template is filled in
    with ``source``'s fields (``{case}``, ``{folder}``, manifest columns)."""
    from ..brats_layout import REGIONS

    if mode.lower() == "none":
        return [None] * len(specs)
    if mode.lower() != "auto" and mode.upper() not in REGIONS:
        return [_reference_mask_file(mode[5:], case, source, adapter)] * len(specs)
    try:
        regions = adapter.reference_regions(case, source)  # [3, *S] TC, WT, ET, or None without a label file
    except MedcamError as e:
        raise PipelineError(str(e).replace("--target", "--reference", 1)) from e
    if mode.lower() == "auto":
        refs: list[torch.Tensor | None] = []
        for s in specs:
            refs.append(regions[REGIONS.index(s.region)] if regions is not None and s.region in REGIONS else None)
            if refs[-1] is None:
                why = "no label file" if regions is None else f"the label has no region {s.region!r}"
                logger.info("case %s: no reference for target %s (%s)", case.case_id, s.name, why)
        return refs
    if regions is None:
        raise PipelineError(
            f"--reference {mode}: case {case.case_id} has no label (seg) file; use --reference mask:FILE (for a cohort "
            "mask:{folder}/NAME.nii.gz, one file per case) or none"
        )
    return [regions[REGIONS.index(mode.upper())]] * len(specs)


def _reference_mask_file(path: str, case: Any, source: CaseSource | None, adapter: Any) -> torch.Tensor:
    """``--reference mask:PATH`` (a template filled in with ``source``'s fields): the mask file's non-zero voxels on
    the model's grid, mapped by the adapter's targets (as ``--target mask:``)."""
    ref = TargetSpec(f"mask:{path}", "mask", 0, "reference", path=path, template=path if "{" in path else None)
    try:
        if ref.is_template and source is not None:
            ref = case_specs([ref], source)[0]
        (roi,) = adapter.targets([ref], case, source, None)  # a MaskROI on the model's grid
    except MedcamError as e:
        raise PipelineError(str(e).replace("--target", "--reference", 1)) from e
    return torch.as_tensor(roi.mask) > 0


def _case_metrics(metrics: tuple[str, ...], explicit: bool, mode: str, case: Any, refs: list[Any]) -> tuple[str, ...]:
    """The metrics of one case: localisation dropped (with a warning) when it has no reference and was not asked
    for by name."""
    if "localisation" not in metrics or any(r is not None for r in refs):
        return metrics
    if explicit or mode.lower() != "auto":
        raise PipelineError(
            f"case {case.case_id}: --metrics localisation needs a reference mask; the case has no label file "
            "(use --reference mask:FILE, for a cohort mask:{folder}/NAME.nii.gz, one file per case)"
        )
    logger.warning(
        "case %s has no label file: localisation skipped (use --reference mask:FILE, for a cohort "
        "mask:{folder}/NAME.nii.gz, one file per case)",
        case.case_id,
    )
    return tuple(m for m in metrics if m != "localisation")


def _check_sanity(metrics: tuple[str, ...], named: Sequence[str], adapter: Any) -> tuple[str, ...]:
    """The sanity check randomises the network's weights: refused (named) or dropped (through ``all``, with a
    warning) for an adapter whose explanation loads its weights itself (nnU-Net's folds), before any case."""
    if "sanity" not in metrics or not adapter.own_executor:
        return metrics
    why = (
        f"the sanity check randomises the network's weights, which the {adapter.framework.value} model's own "
        "explanation does not use (it loads each fold's checkpoint)"
    )
    if "sanity" in [n.lower() for n in named]:
        raise PipelineError(f"--metrics sanity: {why}; drop sanity from --metrics")
    logger.warning("sanity skipped: %s", why)
    return tuple(m for m in metrics if m != "sanity")


def _serialise(result: Any) -> dict[str, Any]:
    return {
        "settings": result.settings,
        "rows": result.rows,
        "curves": [[list(k), *v] for k, v in result.curves.items()],
        "sweeps": [[list(k), *v] for k, v in result.sweeps.items()],
    }


def _deserialise(data: dict[str, Any]) -> Any:
    from ..evaluation import EvaluationResult

    return EvaluationResult(
        rows=list(data["rows"]),
        curves={tuple(k): (x, y) for k, x, y in data["curves"]},
        sweeps={tuple(k): (x, y) for k, x, y in data["sweeps"]},
        settings=dict(data.get("settings") or {}),
    )


@dataclass
class AdapterModel:
    """One case of a framework adapter as an :class:`~medcam.evaluation.EvaluationModel`: the faithfulness metrics
    re-run the framework's own prediction on perturbed copies of the case's image
    (:meth:`~medcam.frameworks.base.FrameworkAdapter.predict_image`: MONAI's inferer with the model's window
    settings, a bundle's inferer settings, nnU-Net's predictor with its tiles, mirrors and folds), and the maps are
    the adapter's plan explained by the one executor (:func:`medcam.frameworks.base.explain`), those of
    ``medcam explain``. The same path for every adapter; medcam's evaluation knows no framework."""

    adapter: Any
    case: Any
    inferer: Any
    device: torch.device

    @property
    def network(self) -> torch.nn.Module:
        return self.adapter.network

    @property
    def supports_sanity(self) -> bool:
        return not self.adapter.own_executor

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter.predict_image(self.case, images, inferer=self.inferer, device=self.device)

    def explain(
        self, method: type, layer: str, image: torch.Tensor, targets: list[Any], output: torch.Tensor
    ) -> tuple[torch.Tensor, str]:
        """The adapter's explanation of the case (``image`` is its image), reusing the prediction ``output``."""
        from ..frameworks.base import explain as explain_plan

        plan = self.adapter.plan(self.case, inferer=self.inferer, device=self.device)
        res = explain_plan(self.adapter, method, plan, targets, layer, output=output, amp=False, progress=False)
        return res.maps[0], str(res.layer or layer)

    def randomised_map(self, method: type, layer: str, image: torch.Tensor, target: Any) -> Any:
        """medcam's executor on the randomised network with the run's inferer, as :meth:`explain` runs it for an
        adapter without an executor of its own (:attr:`supports_sanity`)."""
        from ..evaluation import NetworkModel

        return NetworkModel(self.network, self.inferer).randomised_map(method, layer, image, target)


@dataclass
class EvaluateWork:
    """``medcam evaluate``'s work on one case (a :data:`~medcam.pipeline.cohort.CaseWork`), picklable: shipped by the
    cohort loop to every worker of an executor. ``work(source, staging)`` loads the case, explains and scores it
    (:func:`medcam.evaluation.evaluate`) through the model's adapter (:class:`AdapterModel`); its rows, curves and
    sweeps go into its journal summary."""

    prepared: Prepared
    threshold: float | None
    metrics: tuple[str, ...]
    explicit: bool
    mode: str
    kw: dict[str, Any] = field(default_factory=dict)
    #: a progress bar over each case's (layer, method) steps
    progress: bool = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with the model on the CPU (a worker may have no GPU); the caller's model is not moved. An
        adapter that pickles itself (nnU-Net: without its model) brings its network back in :meth:`setup`."""
        state = self.__dict__.copy()
        model = self.prepared.model
        net = model.net
        if model.framework_adapter is not None:
            state["prepared"] = replace(self.prepared, model=replace(model, net=torch.nn.Identity()))
        elif any(t.device.type != "cpu" for t in itertools.chain(net.parameters(), net.buffers())):
            state["prepared"] = replace(self.prepared, model=replace(model, net=copy.deepcopy(net).cpu()))
        return state

    def setup(self, device: str | None = None) -> EvaluateWork:
        """This work on ``device`` (the model moved, or loaded, there once); None: the configured device, as it is."""
        if device is None or device == self.prepared.device:
            return self
        model = self.prepared.model
        adapter = model.adapter.setup(device)  # a worker's own unpickled copy
        prepared = replace(self.prepared, model=replace(model, net=adapter.network), device=device)
        return replace(self, prepared=prepared)

    def __call__(self, src: CaseSource, staging: Any = None) -> dict[str, Any]:
        from ..evaluation import evaluate

        p = self.prepared
        adapter = p.model.adapter
        case = load_case(src, p.model)
        refs = _reference_masks(self.mode, case, p.specs, src, adapter)
        case_metrics = _case_metrics(self.metrics, self.explicit, self.mode, case, refs)
        tl = adapter.targets(p.specs, case, src, self.threshold)
        image = torch.as_tensor(case.image.as_tensor() if hasattr(case.image, "as_tensor") else case.image)
        em = AdapterModel(adapter, case, p.inferer, torch.device(p.device))
        res = evaluate(
            em, image[None].float().to(p.device), tl, methods=p.methods, layers=p.layers,
            reference=refs if "localisation" in case_metrics else None, spacing=spacing_of(case.image.affine),
            metrics=case_metrics, output_activation=adapter.activation.value, case_id=src.case_id,
            target_names=[s.name for s in p.specs], progress=self.progress, **self.kw,
        )  # fmt: skip
        logger.info("case %s: %d rows", src.case_id, len(res.rows))
        return _serialise(res)


def part_suffix(num_parts: int, part_id: int) -> str:
    """``""`` for a whole run, ``".part<i>-of-<N>"`` for one part of a split run (added to the names of its tables
    and of its journal, so that the parts can share one output folder)."""
    return "" if num_parts == 1 else f".part{part_id}-of-{num_parts}"


def evaluate_files(
    inputs: Sequence[str],
    settings: RunSettings,
    options: EvaluationOptions,
    output: PathLike = "medcam-eval",
    *,
    executor: str | Executor | None = None,
    num_parts: int = 1,
    part_id: int = 0,
) -> dict[str, Any]:
    """The body of ``medcam evaluate``. Returns ``{"paths", "result", "cases", "failed", "run"}``.

    ``executor``: who evaluates the cases (see :func:`medcam.pipeline.explain_cohort`): None/``"local"`` this
    process, ``"ray"`` or a ``RayExecutor`` Ray workers; the results are gathered in cohort order either way.

    ``num_parts``/``part_id``: evaluate only this part's share of the cases (:func:`~medcam.pipeline.split_parts`,
    as ``medcam explain``); its tables are ``metrics.part<i>-of-<N>.csv`` (``.json``, plots likewise), so that
    the parts can write to one folder; together they hold every case's rows exactly once. ``cases`` counts this
    part's cases.

    Every argument is validated (inputs, model, methods, layers, targets, metrics, reference, output files) before
    the first case is explained. Raises :class:`~medcam.MedcamError` for bad input, and when every case failed.
    """
    from ..evaluation import EvaluationResult, check_outputs, write_results

    metrics, explicit = parse_metrics(options.metrics)
    kw = options.checked()
    mode = _check_reference(options.reference)
    if mode.lower() == "none" and "localisation" in metrics:
        if explicit:
            raise PipelineError("--metrics localisation needs a reference; drop --reference none")
        metrics = tuple(m for m in metrics if m != "localisation")
    if not metrics:
        raise PipelineError("no metrics left to compute; choose --metrics")
    p = prepare(
        inputs,
        settings,
        default_methods=("gradcam", "hirescam"),
        num_parts=num_parts,
        part_id=part_id,
        allow_synth=True,
    )
    metrics = _check_sanity(metrics, options.metrics, p.model.adapter)
    out_dir, suffix = Path(output), part_suffix(num_parts, part_id)
    check_outputs(out_dir, settings.overwrite, options.plots, suffix=suffix)  # before the expensive part
    record = {**p.record(settings), "layers": p.layers, "metrics": list(metrics), "reference": mode, **kw}
    journal = out_dir / f"{JOURNAL}{suffix}"
    work = EvaluateWork(p, settings.threshold, metrics, explicit, mode, kw, progress=settings.progress)
    run = run_cohort(
        p.cases, work, journal, settings=record, case_root=journal / "cases", overwrite=settings.overwrite,
        progress=settings.progress, executor=executor, log_dir=out_dir / "logs", num_parts=num_parts,
        part_id=part_id,
    )  # fmt: skip
    total = EvaluationResult()
    for rec in run["cases"]:
        if rec["status"] != "failed":
            total.extend(_deserialise(read_summary(journal / "cases" / rec["case_id"]) or {}))
    failed = [(r["case_id"], r["error"]) for r in run["cases"] if r["status"] == "failed"]
    n_cases = run["cases_in_part"]
    if not total.rows and n_cases:
        shutil.rmtree(journal, ignore_errors=True)  # nothing to resume: every case failed
        first = failed[0] if failed else ("-", "no rows")
        raise PipelineError(f"all {n_cases} case(s) failed; first: {first[0]}: {first[1]}")
    if not n_cases:
        logger.warning("part %d of %d has no cases (%d in the cohort): empty tables", part_id, num_parts, len(p.cases))
    paths = write_results(total, out_dir, overwrite=settings.overwrite, plots=options.plots, suffix=suffix)
    shutil.rmtree(journal, ignore_errors=True)  # the tables are written: the journal has served
    return {"paths": paths, "result": total, "cases": n_cases, "failed": failed, "run": run}
