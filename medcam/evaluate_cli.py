"""``medcam evaluate``: score CAM methods x layers x targets on cases with :mod:`medcam.metrics`.

The command reuses the ``medcam explain`` machinery of :mod:`medcam.pipeline` (case discovery, model loading from
``demo`` / a factory / a MONAI bundle, the target grammar, the preprocessing and sliding windows), explains every
case with every ``--method`` at every ``--layer`` for every ``--target``, scores the maps with
:func:`medcam.evaluation.evaluate` and writes ``metrics.csv``, ``metrics.json`` and plots with
:func:`medcam.evaluation.write_results` (atomic; existing files are refused unless ``--overwrite``).

Bad input (missing path, unknown method / metric / layer / target, output exists, ...) is reported as ONE line
``medcam: error: ...`` on stderr with exit code 1 (a :class:`click.ClickException`); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from .cli_ray import ray_executor_from_options, ray_options

__all__ = ["evaluate_command", "EvaluateError", "parse_metrics", "parse_map_threshold"]

logger = logging.getLogger(__name__)

EPILOG = """\b
Examples:
  # the demo model on one BraTS case: localisation against the case's own TC/WT/ET labels, deletion/insertion,
  # average drop, for Seg-Grad-CAM and Seg-HiRes-Grad-CAM at the default layer
  medcam evaluate BraTS2021_00000/ -o eval --target ET --target WT
\b
  # a cohort, two layers, every metric, a MetaCAM-style consensus map
  medcam evaluate cases/ -o eval -M gradcam,hirescam,layercam -l down_layers.2 -l down_layers.3 \\
      --metrics all --consensus
\b
  # your own mask as the localisation reference (on the original image grid), fewer deletion steps
  medcam evaluate case/ -o eval --reference mask:lesion.nii.gz --steps 10
\b
--reference (the mask G of the localisation metrics):
  auto       the case's own label region named like each target's region (BraTS: TC, WT, ET); no
             localisation for cases without a label file [default]
  WT|TC|ET   that label region of the case for every target
  mask:FILE  a binary mask on the ORIGINAL image grid (same shape/affine as the input), for every target
  none       no reference (localisation is skipped)
\b
Output: OUT/metrics.csv (columns case, method, layer, target, metric, value), OUT/metrics.json,
OUT/deletion_insertion.png, OUT/threshold_sweep.png."""


class EvaluateError(click.ClickException):
    """A one-line error of ``medcam evaluate`` (exit code 1), printed like the other ``medcam`` commands."""

    def show(self, file: Any = None) -> None:  # noqa: D102 - click API
        click.echo(f"medcam: error: {' '.join(self.format_message().split())}", err=True)


# ---------------------------------------------------------------------------------------------------- helpers
def _split(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


def parse_metrics(values: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """``--metrics`` values (repeatable, comma-separated, ``all``, ``default``) -> (metric groups, whether
    ``localisation`` was named explicitly; through ``all`` / ``default`` it is dropped for cases without reference).

    Raises:
        EvaluateError: unknown metric group.
    """
    from .evaluation import ALL_METRICS, DEFAULT_METRICS

    names = [v.lower() for v in _split(values)]
    if not names:
        return tuple(DEFAULT_METRICS), False
    out: list[str] = []
    for n in names:
        group = ALL_METRICS if n == "all" else DEFAULT_METRICS if n == "default" else (n,)
        for g in group:
            if g not in ALL_METRICS:
                raise EvaluateError(f"unknown metric {n!r}; choose from {', '.join(ALL_METRICS)}, default or all")
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
        val = float(num)
    except ValueError:
        val = None
    if kind == "percentile" and val is not None and 0 <= val <= 100:
        return "percentile", val
    if kind == "value" and val is not None and 0 <= val <= 1:
        return "value", val
    raise EvaluateError(f"--map-threshold must be otsu, percentile:Q (0-100) or value:V (0-1), got {text!r}")


def _baseline(text: str) -> str | float:
    t = text.strip().lower()
    if t in ("zero", "mean", "blur"):
        return t
    try:
        return float(t)
    except ValueError:
        raise EvaluateError(f"--baseline must be zero, mean, blur or a number, got {text!r}") from None


def _device(name: str) -> str:
    from .pipeline import PipelineError, resolve_device

    try:
        return resolve_device(name)
    except PipelineError as e:
        raise EvaluateError(str(e)) from None


def _ints3(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("0", "none"):
        return ()
    try:
        vals = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise EvaluateError(f"{what} must be integers like 96,96,96, got {text!r}") from None
    vals = vals * 3 if len(vals) == 1 else vals
    if len(vals) != 3 or min(vals) < 1:
        raise EvaluateError(f"{what} needs 1 or 3 positive integers, got {text!r}")
    return vals


def _floats3(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EvaluateError(f"{what} must be numbers like 2 or 1,1,2.5, got {text!r}") from None
    vals = vals * 3 if len(vals) == 1 else vals
    if len(vals) != 3 or min(vals) <= 0:
        raise EvaluateError(f"{what} needs 1 or 3 positive numbers (mm), got {text!r}")
    return vals


def _setup_logging(quiet: bool, verbose: int, debug: bool) -> None:
    """The ``medcam`` CLI's logging setup when available (one style for every command), else a minimal one."""
    try:
        from .cli import _setup_logging as cli_setup  # the sibling command line, fully imported by now
    except ImportError:
        cli_setup = None
    if cli_setup is not None:
        cli_setup(quiet, verbose, debug)
        return
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    log = logging.getLogger("medcam")
    if not any(getattr(h, "_medcam_eval", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._medcam_eval = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter("medcam: %(message)s"))
        log.addHandler(h)
    log.setLevel(level)


# ---------------------------------------------------------------------------------------------------- references
def _reference_masks(ref_spec: str, case: Any, specs: Sequence[Any]) -> list[Any]:
    """One reference mask (bool tensor on the preprocessed grid) or None per target spec."""
    import torch

    from .data.brats import REGIONS

    mode = ref_spec.strip()
    if mode.lower() == "none":
        return [None] * len(specs)
    label = getattr(case, "label", None)
    label_names = list(REGIONS) if label is not None else []

    def label_region(name: str) -> torch.Tensor:
        lab = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        return lab[label_names.index(name)] > 0

    if mode.lower() == "auto":
        out = []
        for s in specs:
            if label is not None and s.region in label_names:
                out.append(label_region(s.region))
            else:
                out.append(None)
                logger.info(
                    "case %s: no reference for target %s (%s)",
                    case.case_id,
                    s.name,
                    "no label file" if label is None else f"the label has no region {s.region!r}",
                )
        return out
    if mode.upper() in REGIONS:
        if label is None:
            raise EvaluateError(
                f"--reference {mode}: case {case.case_id} has no label (seg) file; use --reference mask:FILE or none"
            )
        return [label_region(mode.upper())] * len(specs)
    path = mode[5:] if mode.lower().startswith("mask:") else mode
    if not path or not Path(path).is_file():
        raise EvaluateError(
            f"--reference {ref_spec!r}: expected auto, none, TC/WT/ET or mask:FILE "
            f"(a mask on the original image grid){'' if not path else f'; file {path!r} not found'}"
        )
    from .errors import MedcamError
    from .pipeline import TargetSpec, mask_on_case_grid

    try:
        arr = mask_on_case_grid(case, TargetSpec(f"mask:{path}", "mask", 0, "reference", path=path))
    except MedcamError as e:
        raise EvaluateError(str(e).replace("--target", "--reference", 1)) from e
    return [torch.from_numpy(arr) > 0] * len(specs)


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class EvaluateWork:
    """``medcam evaluate``'s per-case job, picklable (shipped once to each worker of an executor).

    :meth:`run_case` loads one case, explains and scores it (:func:`medcam.evaluation.evaluate`) and returns the
    record ``{case_id, status, result | error, seconds}``; with ``raise_errors`` (a one-case run in this process)
    a bad case raises instead, as the command always did.
    """

    model: Any
    methods: list[str]
    layers: list[str]
    specs: list[Any]
    ref_mode: str
    metrics: tuple[str, ...]
    explicit: bool
    threshold: float | None
    map_threshold: Any
    tolerance_mm: float
    steps: int
    baseline: Any
    batch_size: int
    percentiles: tuple[float, ...]
    inferer: Any
    consensus: bool
    sanity_steps: int
    device: str
    out_dir: Path
    raise_errors: bool = False
    hd95_convention: str = "monai"
    insertion_protocol: str = "rise"
    tie_draws: int = 3

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "logs"

    def setup(self, device: str | None = None) -> EvaluateWork:
        if device is None or device == self.device:
            return self
        self.model.net.to(device)  # a worker's own unpickled copy
        return replace(self, device=device, raise_errors=False)

    def cost(self, src: Any) -> float:
        from .pipeline.executors import input_bytes

        return input_bytes(src)

    def failed_record(self, src: Any, error: str) -> dict[str, Any]:
        return {"case_id": src.case_id, "status": "failed", "error": error, "seconds": 0.0}

    def discard_partial(self, src: Any) -> None:
        """Nothing to remove: a case writes nothing, the driver writes the tables at the end."""

    def _case_metrics(self, case: Any, refs: list[Any]) -> tuple[str, ...]:
        case_metrics = self.metrics
        if "localisation" in case_metrics and all(r is None for r in refs):
            if self.explicit or self.ref_mode.lower() != "auto":
                raise EvaluateError(
                    f"case {case.case_id}: --metrics localisation needs a reference mask; "
                    "the case has no label file (use --reference mask:FILE)"
                )
            logger.warning("case %s has no label file: localisation skipped (use --reference mask:FILE)", case.case_id)
            case_metrics = tuple(m for m in case_metrics if m != "localisation")
        return case_metrics

    def run_case(self, src: Any) -> dict[str, Any]:
        import torch

        from .errors import MedcamError
        from .evaluation import evaluate
        from .pipeline import build_targets, load_case, spacing_of

        t0 = time.perf_counter()
        try:
            case = load_case(src, self.model)
            refs = _reference_masks(self.ref_mode, case, self.specs)
            case_metrics = self._case_metrics(case, refs)
            tl = build_targets(self.specs, case, activation=self.model.activation, threshold=self.threshold)
            image = case.image.as_tensor() if hasattr(case.image, "as_tensor") else torch.as_tensor(case.image)
            image = image[None].float().to(self.device)
            res = evaluate(
                self.model.net, image, tl, methods=self.methods, layers=self.layers,
                reference=refs if "localisation" in case_metrics else None, spacing=spacing_of(case.image.affine),
                metrics=case_metrics, threshold=self.map_threshold, tolerance_mm=self.tolerance_mm, steps=self.steps,
                baseline=self.baseline, batch_size=self.batch_size, road_percentiles=self.percentiles,
                output_activation=self.model.activation, inferer=self.inferer, consensus=self.consensus,
                sanity_max_steps=self.sanity_steps, case_id=src.case_id, target_names=[s.name for s in self.specs],
                hd95_convention=self.hd95_convention, insertion_protocol=self.insertion_protocol,
                tie_draws=self.tie_draws,
            )  # fmt: skip
        except (MedcamError, click.ClickException, ValueError, OSError, RuntimeError) as e:
            if self.raise_errors:
                raise
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            logger.error("case %s failed: %s", src.case_id, " ".join(msg.split()))
            return {"case_id": src.case_id, "status": "failed", "error": " ".join(msg.split()), "seconds": 0.0}
        return {"case_id": src.case_id, "status": "ok", "result": res, "seconds": time.perf_counter() - t0}


def run_evaluation(
    inputs: Sequence[str],
    *,
    output: str,
    model_spec: str = "demo",
    checkpoint: str | None = None,
    methods: Sequence[str] = (),
    layers: Sequence[str] = (),
    targets: Sequence[str] = (),
    reference: str = "auto",
    metrics: Sequence[str] = (),
    steps: int = 20,
    baseline: str = "zero",
    map_threshold: str = "otsu",
    tolerance_mm: float = 0.0,
    road_percentiles: str = "10,20,30,40,50,60,70,80,90",
    batch_size: int = 4,
    consensus: bool = False,
    sanity_steps: int = 6,
    regions: str | None = None,
    activation: str | None = None,
    threshold: float | None = None,
    channel_order: str | None = None,
    spacing: str | None = None,
    crop_foreground: bool | None = None,
    roi_size: str | None = None,
    overlap: float | None = None,
    device: str = "auto",
    overwrite: bool = False,
    plots: bool = True,
    hd95_convention: str = "monai",
    insertion_protocol: str = "rise",
    tie_draws: int = 3,
    executor: Any = None,
) -> dict[str, Any]:
    """The body of ``medcam evaluate`` (usable from Python). Returns ``{"paths", "result", "cases", "failed"}``.

    ``executor``: who evaluates the cases (see :func:`medcam.pipeline.explain_cohort`): None/``"local"`` this
    process, ``"ray"`` or a ``RayExecutor`` Ray workers; the results are gathered in cohort order either way.

    Every argument is validated (inputs, model, methods, layers, targets, metrics, output files) before the first
    case is explained. Raises :class:`EvaluateError` (or a :class:`~medcam.errors.MedcamError`) for bad input.
    """

    from .evaluation import EvaluationResult, check_outputs, write_results
    from .methods import METHODS
    from .pipeline import (
        default_targets,
        discover_cases,
        load_model,
        make_inferer,
        parse_targets,
        sliding_settings,
    )

    method_list = list(dict.fromkeys(m.lower() for m in _split(methods))) or ["gradcam", "hirescam"]
    unknown = [m for m in method_list if m not in METHODS]
    if unknown:
        raise EvaluateError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    metric_list, explicit = parse_metrics(metrics)
    thr = parse_map_threshold(map_threshold)
    base = _baseline(baseline)
    if steps < 1:
        raise EvaluateError(f"--steps must be >= 1, got {steps}")
    if sanity_steps < 1:
        raise EvaluateError(f"--sanity-steps must be >= 1, got {sanity_steps}")
    if batch_size < 1:
        raise EvaluateError(f"--batch-size must be >= 1, got {batch_size}")
    if tie_draws < 1:
        raise EvaluateError(f"--tie-draws must be >= 1, got {tie_draws}")
    if threshold is not None and not 0 < threshold < 1:
        raise EvaluateError(f"--threshold must be a probability in (0, 1), got {threshold}")
    try:
        percentiles = tuple(float(v) for v in road_percentiles.split(","))
    except ValueError:
        raise EvaluateError(f"--road-percentiles must be numbers like 10,50,90, got {road_percentiles!r}") from None
    if not percentiles or not all(0 < p < 100 for p in percentiles):
        raise EvaluateError(f"--road-percentiles must lie in (0, 100), got {road_percentiles!r}")
    ref_mode = reference.strip()
    if ref_mode.lower() == "none" and "localisation" in metric_list:
        if explicit:
            raise EvaluateError("--metrics localisation needs a reference; drop --reference none")
        metric_list = tuple(m for m in metric_list if m != "localisation")
    if not metric_list:
        raise EvaluateError("no metrics left to compute; choose --metrics")
    dev = _device(device)

    pre: dict[str, Any] = {}
    if spacing is not None:
        pre["spacing"] = _floats3(spacing, "--spacing")
    if crop_foreground is not None:
        pre["crop_foreground"] = crop_foreground
    roi = _ints3(roi_size, "--roi-size")
    order = [c.strip().lower() for c in channel_order.split(",")] if channel_order else None
    region_names = [r.strip() for r in regions.split(",") if r.strip()] if regions else None

    cases = discover_cases(list(inputs))
    loaded = load_model(
        model_spec,
        checkpoint=checkpoint,
        device=dev,
        regions=region_names,
        activation=activation,
        channel_order=order,
        preprocessing=pre or None,
        roi_size=roi,
    )
    specs = parse_targets(targets, loaded.regions) if targets else default_targets(loaded.regions)
    layer_list = list(dict.fromkeys(_split(layers))) or [loaded.default_layer]
    from .layers import resolve_layer

    for lay in layer_list:
        if lay != "auto":
            resolve_layer(loaded.net, lay)
    inferer = make_inferer(loaded.roi_size, **sliding_settings(loaded.sliding, overlap=overlap), progress=False)
    out_dir = Path(output)
    check_outputs(out_dir, overwrite, plots)  # before the expensive part
    logger.info(
        "evaluate: %d case(s), methods %s, layers %s, targets %s, metrics %s",
        len(cases),
        method_list,
        layer_list,
        [s.name for s in specs],
        list(metric_list),
    )

    work = EvaluateWork(
        loaded, method_list, layer_list, specs, ref_mode, metric_list, explicit, threshold, thr, tolerance_mm, steps,
        base, batch_size, percentiles, inferer, consensus, sanity_steps, dev, out_dir, raise_errors=len(cases) == 1,
        hd95_convention=hd95_convention, insertion_protocol=insertion_protocol, tie_draws=tie_draws,
    )  # fmt: skip
    from .pipeline.executors import resolve_executor

    runner = resolve_executor(executor)
    by_id: dict[str, dict[str, Any]] = {}

    def record(rec: dict[str, Any]) -> None:
        by_id[rec["case_id"]] = rec
        if rec["status"] == "ok":
            logger.info(
                "case %d/%d %s: %d rows in %.1f s",
                len(by_id),
                len(cases),
                rec["case_id"],
                len(rec["result"].rows),
                rec["seconds"],
            )

    runner.run(work, cases, record)
    total = EvaluationResult()
    failed: list[tuple[str, str]] = []
    for src in cases:  # cohort order, whoever ran the cases
        rec = by_id[src.case_id]
        if rec["status"] == "ok":
            total.extend(rec["result"])
        else:
            failed.append((src.case_id, rec["error"]))
    if len(cases) == 1 and failed:
        raise EvaluateError(failed[0][1])
    if not total.rows:
        raise EvaluateError(f"all {len(cases)} case(s) failed; first: {failed[0][0]}: {failed[0][1]}")
    paths = write_results(total, out_dir, overwrite=overwrite, plots=plots)
    return {"paths": paths, "result": total, "cases": len(cases), "failed": failed}


# ---------------------------------------------------------------------------------------------------- command
def _method_help() -> str:
    try:
        from .methods import METHODS

        names = ", ".join(METHODS)
    except ImportError:  # pragma: no cover
        names = "gradcam, hirescam, ..."
    return f"CAM method(s), repeat or comma-separate: {names}. [default: gradcam,hirescam]"


@click.command("evaluate", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "-m",
    "model_spec",
    default="demo",
    show_default=True,
    metavar="MODEL",
    help="'demo', 'package.module:function' / 'file.py:function' (factory), or a MONAI bundle folder.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="state_dict file for a factory model (loaded with weights_only=True).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="medcam-eval",
    show_default=True,
    help="Output folder for metrics.csv, metrics.json and the plots.",
)
@click.option("--method", "-M", "methods", multiple=True, metavar="NAME", help=_method_help())
@click.option(
    "--layer",
    "-l",
    "layers",
    multiple=True,
    metavar="NAME",
    help="Layer(s) to explain, repeatable, or 'auto'. [default: the model's default, demo: down_layers.3]",
)
@click.option(
    "--target",
    "-t",
    "targets",
    multiple=True,
    metavar="SPEC",
    help="Target(s) as in `medcam explain`: ET (predicted ET), ET:class, TC:component=largest, "
    "mask:FILE[:REGION], box:x0,y0,z0:x1,y1,z1[:REGION], channel:N. "
    "[default: predicted region of each named output]",
)
@click.option(
    "--reference",
    "-r",
    default="auto",
    show_default=True,
    metavar="REF",
    help="Reference mask of the localisation metrics: auto (the case's label region matching each "
    "target), TC|WT|ET, mask:FILE (original image grid), or none.",
)
@click.option(
    "--metrics",
    "metrics",
    multiple=True,
    metavar="NAMES",
    help="Metric groups, repeat or comma-separate: localisation, deletion, insertion, average_drop, road, "
    "sanity; 'all' or 'default'. [default: localisation,deletion,insertion,average_drop]",
)
@click.option("--steps", type=int, default=20, show_default=True, help="Deletion / insertion steps.")
@click.option(
    "--baseline",
    default="zero",
    show_default=True,
    help="Deletion substrate (and the insertion start with --insertion-protocol baseline): zero, mean, blur or a number.",
)
@click.option(
    "--map-threshold",
    default="otsu",
    show_default=True,
    help="Threshold of the min-max normalised map for Dice / IoU / HD95: otsu, percentile:Q or value:V.",
)
@click.option("--tolerance-mm", type=float, default=0.0, show_default=True, help="Pointing-game tolerance (mm).")
@click.option(
    "--road-percentiles",
    default="10,20,30,40,50,60,70,80,90",
    show_default=True,
    help="ROAD removal percentages (with --metrics road; the paper's grid by default).",
)
@click.option(
    "--hd95-convention",
    type=click.Choice(["monai", "pooled"]),
    default="monai",
    show_default=True,
    help="HD95: monai = max of the two directed 95th percentiles; pooled = medpy's percentile of both (row "
    "hd95_monai_mm / hd95_pooled_mm).",
)
@click.option(
    "--insertion-protocol",
    type=click.Choice(["rise", "baseline"]),
    default="rise",
    show_default=True,
    help="Insertion: rise = from the blurred image, mean ROI probability (RISE); baseline = from --baseline, logits.",
)
@click.option(
    "--tie-draws",
    type=int,
    default=3,
    show_default=True,
    help="Random tie-breaking orders averaged by deletion / insertion / ROAD.",
)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Perturbed images per forward pass.")
@click.option("--consensus", is_flag=True, help="Also score a MetaCAM-style consensus map of the methods.")
@click.option(
    "--sanity-steps",
    type=int,
    default=6,
    show_default=True,
    help="Cascade steps with a map in the sanity check (evenly spaced over the layers, last included).",
)
@click.option("--regions", default=None, metavar="A,B,C", help="Names of the output channels (demo: TC,WT,ET).")
@click.option(
    "--activation",
    type=click.Choice(["sigmoid", "softmax"]),
    default=None,
    help="The model's output activation. [default: sigmoid]",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Probability threshold of predicted regions [default: 0.5 sigmoid, argmax softmax].",
)
@click.option(
    "--channel-order",
    default=None,
    metavar="M1,M2,M3,M4",
    help="Order of the BraTS modalities fed to the model. [default: t1,t1ce,t2,flair]",
)
@click.option("--spacing", default=None, metavar="MM", help="Resample to this voxel size (mm) before the model.")
@click.option(
    "--crop-foreground/--no-crop-foreground",
    default=None,
    help="Crop to the non-zero bounding box before the model. [demo: on]",
)
@click.option(
    "--roi-size",
    default=None,
    metavar="X,Y,Z",
    help="Sliding-window size (voxels); 0 = whole image. [demo: 96,96,96; others: whole image]",
)
@click.option(
    "--overlap", type=float, default=None, help="Sliding-window overlap. [default: a bundle's inferer, else 0.25]"
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG plots.")
@click.option("--overwrite", is_flag=True, help="Replace existing metrics files in OUTPUT.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr (the final summary line stays).")
@click.option("--verbose", "-v", count=True, help="More log messages (per-case progress).")
@click.option("--debug", is_flag=True, help="Show the Python traceback of errors.")
@ray_options
def evaluate_command(
    inputs: Sequence[str],
    quiet: bool,
    verbose: int,
    debug: bool,
    ray_address: str | None,
    gpus_per_worker: float | None,
    cpus_per_worker: float,
    workers: int | None,
    max_retries: int,
    **kw: Any,
) -> None:
    """Score CAM methods x layers x targets on a case, image files, or a cohort.

    INPUTS as for `medcam explain`: one BraTS case folder, one folder of case folders, a CSV manifest, or image
    files forming ONE case. Each case is preprocessed like the model expects, explained with every --method at
    every --layer for every --target, and every map is scored: localisation against --reference (energy pointing
    game, pointing game, Dice / IoU / HD95 in mm after --map-threshold, a threshold sweep), deletion / insertion
    AUC, average drop / increase in confidence, ROAD, and the cascading-randomisation sanity check (Spearman / SSIM;
    a dead, constant map counts as similarity 0). One row per (case, method, layer, target, metric).
    """
    _setup_logging(quiet, verbose, debug)
    try:
        kw["executor"] = ray_executor_from_options(
            ray_address, gpus_per_worker, cpus_per_worker, workers, max_retries, kw.get("device", "auto")
        )
        run = run_evaluation(inputs, **kw)
    except click.ClickException as e:
        if debug:
            raise
        raise EvaluateError(e.format_message()) from None
    except KeyboardInterrupt:
        raise EvaluateError("interrupted") from None
    except Exception as e:  # noqa: BLE001 - the one-line error policy
        if debug:
            raise
        from .errors import MedcamError

        text = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (MedcamError, ValueError, OSError)):
            text = f"unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)"
        raise EvaluateError(text) from None
    res = run["result"]
    n_ok = run["cases"] - len(run["failed"])
    click.echo(f"medcam: evaluated {n_ok} case(s), {len(res.rows)} rows -> {run['paths']['csv']}")
    if run["failed"]:
        raise EvaluateError(
            f"{len(run['failed'])} of {run['cases']} case(s) failed: "
            + "; ".join(f"{c}: {m}" for c, m in run["failed"][:3])
        )
