"""The ``medcam`` command line, one click group: ``layers``, ``explain``, ``evaluate``, ``report``, ``demo``.

Options shared by ``explain`` and ``evaluate`` are declared once (:func:`model_options`, :func:`case_options`,
:func:`window_options`, :func:`part_options`, :func:`ray_options`) and mapped onto one :class:`~medcam.pipeline.RunSettings` (and an
executor); the work is done by
:mod:`medcam.pipeline` (which never imports this module). Every command reports bad input (missing file, unknown
layer or target, corrupt NIfTI, TorchScript model, ...) as ONE line ``medcam: error: ...`` on stderr with exit code 1
(usage errors: click's message, exit code 2); ``--debug`` shows the Python traceback instead. Progress bars (tqdm, on
stderr) are silenced by ``--quiet``. Logging handlers and warning filters are set for the command's duration only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from .errors import MedcamError

logger = logging.getLogger("medcam")

F = TypeVar("F", bound=Callable[..., Any])

EPILOG_EXPLAIN = """\b
Examples:
  # one BraTS case folder (<ID>_t1.nii.gz ... or <ID>-t1n.nii.gz ...) with the built-in demo model
  medcam explain BraTS2021_00000/ -o out --target ET --target WT:class
\b
  # a cohort (folder of case folders, or a CSV manifest), split over 2 GPUs
  medcam explain cases/ -o out --device cuda:0 --num-parts 2 --part-id 0
  medcam explain cases/ -o out --device cuda:1 --num-parts 2 --part-id 1
\b
  # your own network: a factory function + state_dict, or a MONAI bundle folder
  medcam explain case/ -o out --model mypkg.nets:build --checkpoint best.pt --regions TC,WT,ET --roi-size 128,128,128
  medcam explain case/ -o out --model brats_mri_segmentation/ --channel-order t1ce,t1,t2,flair \\
      --regions TC,WT,ET --spacing 1 --roi-size 240,240,160
\b
Targets (repeat --target; default: the predicted region of every named output):
  ET  or  ET:predicted      voxels the model predicts as ET (sigmoid > --threshold); score = sum of ET logits there
  ET:class                  every voxel of the ET output channel (original Seg-Grad-CAM)
  TC:component=largest      the largest connected component of the predicted TC; component=2 = second largest
  mask:roi.nii.gz[:WT]      binary mask ON THE ORIGINAL IMAGE GRID (same shape/affine as the input), mapped through
                            the case's preprocessing with nearest-neighbour resampling; region defaults to WT
  mask:{folder}/{case}_seg.nii.gz[:WT]  per-case mask: {case} = case id, {folder} = case folder, {COLUMN} = a
                            manifest column named mask or mask_* (one mask file for several cases is refused)
  label:ET[:REGION]         the case's own reference region (TC/WT/ET from its seg file, BraTS label conventions)
  box:x0,y0,z0:x1,y1,z1[:WT]  voxel box of the original grid, x0 <= i < x1
  channel:N[:class|...]     by output channel number, for models without --regions
\b
Output per case: OUT/<case_id>/summary.json, heatmaps/*.nii.gz (original grid), overlays/*.png, montage.png,
slicer/scene.mrml; with --report also OUT/report/index.html (or later: medcam report OUT).
\b
  # a cohort on Ray workers: a local Ray instance, or the cluster of `ray start` (pip install 'medcam[ray]')
  medcam explain cases/ -o out --ray
  medcam explain cases/ -o out --ray auto --gpus-per-worker 0.5
Resume: a case folder is skipped only if it records the same input files (path, size, modification time) and
settings; any other existing case folder refuses the whole run before anything is written (--overwrite redoes it).
Exit codes: 0 ok, 1 bad input or a failed case, 2 usage error, 130 Ctrl-C, 143 SIGTERM (the case in progress is
abandoned and its staging folder removed; run the same command to resume)."""


EPILOG_EVALUATE = """\b
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
  # a cohort split over 2 GPUs: each part writes OUT/metrics.part<i>-of-2.csv (every case in exactly one)
  medcam evaluate cases/ -o eval --device cuda:0 --num-parts 2 --part-id 0
  medcam evaluate cases/ -o eval --device cuda:1 --num-parts 2 --part-id 1
\b
--reference (the mask G of the localisation metrics):
  auto       the case's own label region named like each target's region (BraTS: TC, WT, ET); no
             localisation for cases without a label file [default]
  WT|TC|ET   that label region of the case for every target
  mask:FILE  a binary mask on the ORIGINAL image grid (same shape/affine as the input), for every target
  none       no reference (localisation is skipped)
\b
Output: OUT/metrics.csv (columns case, method, layer, target, metric, value), OUT/metrics.json,
OUT/deletion_insertion.png, OUT/threshold_sweep.png (a part of a split run: metrics.part<i>-of-<N>.csv, ...).
While it runs, each finished case is kept in OUT/.medcam-journal/ (.medcam-journal.part<i>-of-<N>/; removed when
the tables are written): a rerun after an interruption resumes from it."""


# ---------------------------------------------------------------------------------------------------- plumbing
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = " ".join(record.getMessage().split())
        level = record.levelname.lower()
        text = f"medcam: {level}: {msg}" if record.levelno >= logging.WARNING else f"medcam: {msg}"
        if record.exc_info:  # e.g. the traceback of a failed case, logged at DEBUG level (shown with --debug)
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextlib.contextmanager
def console_logging(quiet: bool, verbose: int, debug: bool) -> Iterator[None]:
    """medcam's log records on stderr, one line each, and third-party warnings hidden unless ``-v``/``--debug``:
    for the ``with`` block only (handler, levels and warning filters are restored on exit)."""
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    saved = logger.level, logger.propagate
    # MONAI's own log records (e.g. 1.6's "nvImageCodec is not available" each time LoadImage is built with pydicom
    # installed) are third-party warnings too: hidden unless -v/--debug, like the warnings module's
    monai_logger = logging.getLogger("monai")
    saved_monai = monai_logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            if not (verbose or debug):
                warnings.simplefilter("ignore")  # deprecations in MONAI/torch are noise on a command line
                monai_logger.setLevel(logging.ERROR)
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        monai_logger.setLevel(saved_monai)


def _fail(msg: str) -> NoReturn:
    click.echo(f"medcam: error: {' '.join(str(msg).split())}", err=True)
    sys.exit(1)


def command_errors(fn: F) -> F:
    """--quiet / --verbose / --debug on a command, its logging context, and the one-line error policy."""

    @click.option("--quiet", "-q", is_flag=True, help="No progress bars, only errors.")
    @click.option("--verbose", "-v", count=True, help="More log messages (INFO; library warnings too).")
    @click.option("--debug", is_flag=True, help="Show the Python traceback of errors (and DEBUG logs).")
    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool, verbose: int, debug: bool, **kwargs: Any) -> Any:
        from .signals import exit_status, stop_on_signals

        with console_logging(quiet, verbose, debug):
            try:
                with stop_on_signals():  # SIGTERM (cluster schedulers) like Ctrl-C: abandon the current case, clean up
                    return fn(*args, quiet=quiet, **kwargs)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
                raise
            except KeyboardInterrupt as e:
                if debug:
                    logger.debug("interrupted", exc_info=True)
                status = exit_status(e)
                name = {130: "SIGINT (Ctrl-C)", 143: "SIGTERM"}.get(status, f"signal {status - 128}")
                click.echo(
                    f"medcam: interrupted by {name}: the case in progress was abandoned and its staging folder "
                    "removed; finished cases are kept, run the same command to resume",
                    err=True,
                )
                sys.exit(status)
            except Exception as e:  # noqa: BLE001 - the one-line error policy (--debug re-raises)
                if debug:
                    raise
                text = " ".join(str(e).split()) or type(e).__name__
                if not isinstance(e, (MedcamError, OSError)):  # a bug: say so
                    text = f"unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)"
                _fail(text)

    return wrapper  # type: ignore[return-value]


def _apply(options: Sequence[Callable[[F], F]], fn: F) -> F:
    for o in reversed(options):
        fn = o(fn)
    return fn


def _ints(text: str | None, what: str, n: int = 3) -> tuple[int, ...] | None:
    """``"96,96,96"`` / ``"96"`` / ``"96x96x96"`` -> n positive integers; ``"0"``/``"0,0,0"``/``"none"`` -> ``()``
    (no sliding window: the whole image); None."""
    if text is None or text == "":
        return None
    if text.strip().lower() in ("0", "none"):
        return ()
    try:
        vals = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be integers like 96,96,96, got {text!r}") from None
    if len(vals) == n and not any(vals):  # 0,0,0 means the same as 0
        return ()
    vals = vals * n if len(vals) == 1 else vals
    if len(vals) != n or min(vals) < 1:
        raise click.BadParameter(f"{what} needs 1 or {n} positive integers, got {text!r}")
    return vals


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _bytes(text: str | None, what: str) -> int | None:
    """``"2GB"`` / ``"512MiB"`` / ``"1000000"`` / ``"0"`` -> bytes; ``"auto"`` or None -> None."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _BYTE_UNITS or value < 0:
        raise click.BadParameter(
            f"{what} must be a size like 4GB, 512MiB, a number of bytes, 0 (keep no graph) or auto, got {text!r}"
        )
    return int(value * _BYTE_UNITS[unit])


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be numbers like 2 or 1,1,2.5, got {text!r}") from None
    vals = vals * 3 if len(vals) == 1 else vals
    if len(vals) != 3 or min(vals) <= 0:
        raise click.BadParameter(f"{what} needs 1 or 3 positive numbers (mm), got {text!r}")
    return vals


def _split_list(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


# ---------------------------------------------------------------------------------------------------- option groups
def model_options(fn: F) -> F:
    """--model, --checkpoint (every command that loads a model)."""
    return _apply(
        [
            click.option(
                "--model", "-m", "model_spec", default="demo", show_default=True, metavar="MODEL",
                help="'demo' (built-in SegResNet, BraTS TC/WT/ET), 'package.module:function' or 'file.py:function' "
                "(factory returning the network), a MONAI bundle folder (configs/inference.json + models/model.pt), or "
                "nnunet:FOLDER (a trained nnU-Net v2 model folder; --folds, --checkpoint-name).",
            ),
            click.option(
                "--checkpoint", type=click.Path(dir_okay=False), default=None,
                help="state_dict file for a factory model (loaded with weights_only=True).",
            ),
        ],
        fn,
    )  # fmt: skip


def case_options(fn: F) -> F:
    """Targets, output naming and the preprocessing of the cases (explain and evaluate)."""
    return _apply(
        [
            click.option(
                "--target", "-t", "targets", multiple=True, metavar="SPEC",
                help="Region of interest to explain (repeatable). `ET` alone = the PREDICTED ET region; ET:class, "
                "TC:component=largest|N, mask:file.nii.gz[:REGION] (per case: mask:{folder}/{case}_seg.nii.gz), "
                "label:ET[:REGION] (the case's seg file), box:x0,y0,z0:x1,y1,z1[:REGION], channel:N[:mode]. "
                "[default: predicted region of each named output]",
            ),
            click.option("--regions", default=None, metavar="A,B,C", help="Names of the output channels in order (demo: TC,WT,ET)."),
            click.option(
                "--activation", type=click.Choice(["sigmoid", "softmax", "none"]), default=None,
                help="The model's output activation (predicted regions); 'none' when the network ends in its own "
                "sigmoid/softmax, i.e. outputs probabilities. [default: sigmoid]",
            ),
            click.option(
                "--threshold", type=float, default=None,
                help="Probability threshold of predicted regions [default: 0.5 sigmoid, argmax softmax].",
            ),
            click.option(
                "--channel-order", default=None, metavar="M1,M2,M3,M4",
                help="Order of the BraTS modalities fed to the model, e.g. t1ce,t1,t2,flair for MONAI's "
                "brats_mri_segmentation bundle. [default: t1,t1ce,t2,flair]",
            ),
            click.option("--spacing", default=None, metavar="MM", help="Resample to this voxel size (mm, 1 or 3 numbers) before the model. [demo: 2]"),
            click.option("--orientation", default=None, metavar="CODES", help="Reorient to these axis codes before the model, 'none' to keep. [default: RAS]"),
            click.option(
                "--crop-foreground/--no-crop-foreground", default=None,
                help="Crop to the non-zero bounding box before the model (maps are mapped back). [demo: on]",
            ),
            click.option("--normalize/--no-normalize", default=None, help="Z-score each channel over its non-zero voxels. [default: on]"),
            click.option("--divisible-by", type=int, default=None, help="Pad the preprocessed volume to a multiple of this (whole-image mode)."),
            click.option(
                "--case-id", default=None, metavar="ID",
                help="Case id (output sub-folder) when INPUTS form one case. [default: the folder's name, or the first "
                "file's name unless it is a modality name like t1.nii.gz, then its folder's name]",
            ),
        ],
        fn,
    )  # fmt: skip


def window_options(fn: F) -> F:
    """Sliding windows, device and precision (explain and evaluate)."""
    return _apply(
        [
            click.option(
                "--roi-size", default=None, metavar="X,Y,Z",
                help="Sliding-window size (voxels); 0 or 0,0,0 = whole image. [demo: 96,96,96; others: whole image]",
            ),
            click.option("--overlap", type=float, default=None, help="Sliding-window overlap. [default: a bundle's inferer, else 0.25]"),
            click.option("--sw-batch-size", type=int, default=None, help="Windows per forward pass. [default: a bundle's inferer, else 1]"),
            click.option(
                "--blend", type=click.Choice(["constant", "gaussian"]), default=None,
                help="Sliding-window blending, as MONAI's sliding_window_inference. [default: a bundle's inferer, else constant]",
            ),
            click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
            click.option("--amp", is_flag=True, help="Mixed precision (autocast; bf16 on CPU). Maps are formed in fp32."),
            click.option(
                "--graph-budget", default="auto", show_default=True, metavar="SIZE",
                help="Memory for the autograd graphs kept while the explanation forms the prediction in its own pass "
                "(predicted-region targets: no second inference), e.g. 4GB or 512MiB; passes over it are "
                "recomputed (same maps). auto: half the free memory; 0: keep none.",
            ),
        ],
        fn,
    )  # fmt: skip


def part_options(fn: F) -> F:
    """--num-parts, --part-id: this run's share of a cohort (explain and evaluate)."""
    return _apply(
        [
            click.option(
                "--num-parts", type=int, default=1, show_default=True,
                help="Split the cohort into this many parts (one per machine/GPU).",
            ),
            click.option("--part-id", type=int, default=0, show_default=True, help="Which part this run does (0-based)."),
        ],
        fn,
    )  # fmt: skip


def dicom_options(fn: F) -> F:
    """--dicom-out, and the DICOMweb options of ``medcam explain dicomweb:URL`` (:mod:`medcam.io.dicomweb`)."""
    return _apply(
        [
            click.option(
                "--dicom-out", "dicom", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                help="DICOM outputs per case in CASE/dicom/ (Parametric Map per map, SEG of the regions, RGB "
                "overlay series): auto = for cases given as DICOM series, on = every case (image files: the scan "
                "as a new-study MR series in CASE/dicom/source/, the objects derived from it), off = never.",
            ),
            click.option(
                "--store", is_flag=True,
                help="dicomweb: inputs: send each case's DICOM outputs back to the server (STOW-RS); objects the "
                "server already holds are not sent again.",
            ),
            click.option(
                "--dicomweb-series", multiple=True, metavar="NAME=SERIES_UID",
                help="dicomweb: inputs: the series of each channel (repeat), e.g. t1ce=1.2.3 [default: matched to "
                "t1, t1ce, t2, flair by SeriesDescription].",
            ),
            click.option("--dicomweb-token", default=None, envvar="MEDCAM_DICOMWEB_TOKEN", help="Bearer token (env MEDCAM_DICOMWEB_TOKEN)."),
            click.option("--dicomweb-user", default=None, help="HTTP basic-auth user of the DICOMweb server."),
            click.option("--dicomweb-password", default=None, envvar="MEDCAM_DICOMWEB_PASSWORD", help="Its password (env MEDCAM_DICOMWEB_PASSWORD)."),
            click.option("--dicomweb-timeout", type=float, default=30.0, show_default=True, help="Seconds per DICOMweb request."),
            click.option(
                "--dicomweb-cache", type=click.Path(file_okay=False), default=None,
                help="Where fetched series are kept (re-runs fetch only what is missing). [default: OUTPUT/.dicomweb]",
            ),
        ],
        fn,
    )  # fmt: skip


class _Dicomweb:
    """The dicomweb: part of ``medcam explain``: inputs fetched into local series folders before the run, the
    cases' DICOM outputs stored after it (--store)."""

    def __init__(self, inputs: Sequence[str], output: str, quiet: bool, kw: dict[str, Any]) -> None:
        opts = {k: kw.pop(k) for k in list(kw) if k.startswith("dicomweb_")}
        self.store, self.output, self.quiet = kw.pop("store"), output, quiet
        self.opts = opts
        # medcam.io.dicomweb.is_dicomweb's test, without importing medcam.io (torch, MONAI): input errors stay fast
        web = [i for i in inputs if str(i).startswith("dicomweb:")]
        self.is_web = bool(web)
        self.source: Any = None
        if not web:
            if self.store or opts["dicomweb_series"]:
                raise click.UsageError("--store and --dicomweb-series need a dicomweb: input")
            self.inputs = list(inputs)
            return
        if len(inputs) != 1:
            raise click.UsageError("give one dicomweb: input (a study, or one series of it) and nothing else")
        self.series = dict(s.split("=", 1) for s in opts["dicomweb_series"] if "=" in s)
        if len(self.series) != len(opts["dicomweb_series"]):
            raise click.UsageError("--dicomweb-series takes NAME=SERIES_UID")
        self.cache = Path(opts["dicomweb_cache"] or Path(output) / ".dicomweb")
        self.inputs = list(inputs)

    @property
    def auth(self) -> Any:
        """The :class:`medcam.io.dicomweb.Auth` of the options."""
        from .io.dicomweb import Auth

        o = self.opts
        return Auth(o["dicomweb_token"], o["dicomweb_user"], o["dicomweb_password"], o["dicomweb_timeout"])

    def fetch(self) -> list[str]:
        """The inputs with a dicomweb: input replaced by the manifest of its fetched series."""
        if not self.is_web:
            return self.inputs
        from .io.dicomweb import fetch_case, parse_source

        self.source = parse_source(self.inputs[0])
        manifest = fetch_case(self.source, self.cache, self.auth, explicit=self.series, progress=not self.quiet)
        return [str(manifest)]

    def store_results(self, run: dict[str, Any]) -> None:
        from .io.dicomweb import store_case

        if not self.store or self.source is None:
            return
        for rec in run["cases"]:
            if rec["status"] in ("ok", "skipped"):
                r = store_case(Path(self.output) / rec["case_id"], self.source.root, self.auth, progress=not self.quiet)
                click.echo(
                    f"  stored {r['stored']} DICOM object(s) of {rec['case_id']} on {self.source.root} "
                    f"({r['present']} already there; series {', '.join(r['series'])})"
                )


class _MethodsOption(click.Option):
    """--method, whose help lists the registered methods: read when help is shown, so that `medcam --help` and the
    errors found before the first case do not import torch (start-up < 1.5 s)."""

    def __init__(self, *args: Any, default_methods: str = "hirescam", synth: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.default_methods = default_methods
        self.synth = synth

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from .methods import METHODS

        self.help = (
            f"CAM method(s), repeat or comma-separate: {', '.join(METHODS)}{', synth:FILE' if self.synth else ''} "
            "(gradcam = Seg-Grad-CAM, "
            f"hirescam = Seg-HiRes-Grad-CAM). [default: {self.default_methods}]"
        )
        return super().get_help_record(ctx)


def method_option(default: str, synth: bool = False) -> Callable[[F], F]:
    return click.option(
        "--method", "-M", "methods", multiple=True, metavar="NAME", cls=_MethodsOption, default_methods=default,
        synth=synth,
    )  # fmt: skip


def _slice_at(value: str) -> str:
    """Check ``--slice-at`` (roi, max or x,y,z in RAS mm) before anything runs."""
    from .geometry import parse_slice_at  # not medcam.io (torch, MONAI): a typo answers at once

    try:
        parse_slice_at(value)
    except MedcamError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _check_inputs_exist(inputs: Sequence[str]) -> None:
    """The commonest mistake, reported before torch is imported (about 2 s)."""
    for p in inputs:
        if not Path(p).exists():
            _fail(f"input '{p}' does not exist")


def _check_cases(inputs: Sequence[str], kw: Mapping[str, Any]) -> None:
    """The inputs' cases found from their file names (:func:`medcam.pipeline.cases.discover_cases`, which imports
    neither torch nor MONAI): a case missing a modality, or a folder without a case, is reported in a fraction of a
    second instead of after the imports (several seconds). The run discovers them again (and logs what it ignores);
    nnU-Net models find their own cases (their input layout) once loaded."""
    if str(kw.get("model_spec") or "").startswith("nnunet:"):
        return
    from .pipeline.cases import discover_cases

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the run's own discovery logs the sub-folders it ignores, once
    try:
        discover_cases(list(inputs), case_id=kw.get("case_id"))
    finally:
        logging.disable(previous)


def _check_number_options(kw: dict[str, Any]) -> None:
    """``--roi-size`` and ``--spacing`` parsed (and parsed again later) before torch is imported: a typo answers in
    a fraction of a second instead of after the imports."""
    _ints(kw.get("roi_size"), "--roi-size")
    _floats(kw.get("spacing"), "--spacing")


def ray_options(fn: F) -> F:
    """--ray [ADDRESS] and the options of its workers (explain and evaluate)."""
    return _apply(
        [
            click.option(
                "--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                help="Run the cases on Ray workers: --ray alone starts a local Ray instance (all CPUs/GPUs here); "
                "--ray auto joins the cluster of `ray start`; --ray ray://HEAD:10001 joins through Ray Client. "
                "Needs pip install 'medcam[ray]'.",
            ),
            click.option(
                "--gpus-per-worker", type=float, default=None,
                help="GPU share of each Ray worker (0.5 = two workers per GPU, 0 = CPU workers). "
                "[default: 1 if the cluster has GPUs, else 0]",
            ),
            click.option(
                "--cpus-per-worker", type=float, default=1, show_default=True,
                help="CPU cores of each Ray worker (its torch threads).",
            ),
            click.option(
                "--workers", type=int, default=None,
                help="Number of Ray workers. [default: as many as the cluster's GPUs (or CPUs) allow]",
            ),
            click.option(
                "--max-retries", type=int, default=2, show_default=True,
                help="Ray: how often a case is retried on another worker when its worker dies (killed, out of memory).",
            ),
        ],
        fn,
    )  # fmt: skip


def threads_option(fn: F) -> F:
    """--threads: torch threads of every case, the same wherever it runs (explain and evaluate)."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, metavar="N",
        help="Torch CPU threads of every case, here and on every Ray worker; recorded, so that a folder never mixes "
        "maps of different thread counts (they differ in the last bits). [default: 1, the same on every machine]",
    )(fn)  # fmt: skip


def nnunet_options(fn: F) -> F:
    """--folds, --checkpoint-name, --disable-tta: the checkpoints and mirroring of an nnU-Net model (explain and
    evaluate)."""
    fn = click.option(
        "--disable-tta", is_flag=True,
        help="nnU-Net models: no test-time mirroring (as nnUNetv2_predict --disable_tta).",
    )(fn)  # fmt: skip
    fn = click.option(
        "--checkpoint-name", default="checkpoint_final.pth", show_default=True,
        help="nnU-Net models: checkpoint file in each fold_N.",
    )(fn)  # fmt: skip
    return click.option(
        "--folds", default="0", show_default=True, help="nnU-Net models (--model nnunet:FOLDER): folds, e.g. 0,1,2,3,4."
    )(fn)


def run_executor(kw: dict[str, Any]) -> Any:
    """The ``--ray`` options (popped from ``kw``) as an executor: None (this process) or a checked Ray executor."""
    address, gpus, cpus, workers, retries = (
        kw.pop(k) for k in ("ray_address", "gpus_per_worker", "cpus_per_worker", "workers", "max_retries")
    )
    if address is None:
        if gpus is not None or workers is not None:
            raise click.UsageError("--gpus-per-worker and --workers need --ray")
        return None
    from .pipeline.executors import ray_executor

    if gpus is None and kw.get("device") == "cpu":
        gpus = 0.0  # --device cpu: CPU workers
    return ray_executor(
        None if address == "local" else address, gpus_per_worker=gpus, cpus_per_worker=cpus, workers=workers,
        max_retries=retries,
    )  # fmt: skip


def run_settings(kw: dict[str, Any], quiet: bool) -> Any:
    """The shared options (popped from ``kw``) as one :class:`~medcam.pipeline.RunSettings`."""
    from .pipeline import RunSettings

    shared = [
        "crop_foreground", "normalize", "divisible_by", "spacing", "orientation", "channel_order", "regions",
    ]  # fmt: skip
    v = {k: kw.pop(k, None) for k in shared}
    pre = {k: v[k] for k in ("crop_foreground", "normalize", "divisible_by") if v[k] is not None}
    if v["spacing"] is not None:
        pre["spacing"] = _floats(v["spacing"], "--spacing")
    if v["orientation"] is not None:
        pre["orientation"] = None if v["orientation"].lower() == "none" else v["orientation"].upper()
    channel_order, regions = v["channel_order"], v["regions"]
    return RunSettings(
        model_spec=kw.pop("model_spec"), checkpoint=kw.pop("checkpoint"),
        methods=_split_list(kw.pop("methods", ())), targets=list(kw.pop("targets", ())),
        layers=_split_list(kw.pop("layers", ())), regions=_split_list([regions]) if regions else None,
        activation=kw.pop("activation"), channel_order=[c.lower() for c in _split_list([channel_order] if channel_order else [])] or None,
        threshold=kw.pop("threshold"), preprocessing=pre, roi_size=_ints(kw.pop("roi_size"), "--roi-size"),
        overlap=kw.pop("overlap"), sw_batch_size=kw.pop("sw_batch_size"), blend=kw.pop("blend"),
        device=kw.pop("device"), amp=kw.pop("amp"),
        graph_budget=_bytes(kw.pop("graph_budget", None), "--graph-budget"), threads=kw.pop("threads", None),
        overwrite=kw.pop("overwrite", False), progress=not quiet,
        case_id=kw.pop("case_id", None),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 118})
@click.version_option(package_name="medcam")
def main() -> None:
    """medcam: class activation maps (CAMs) for 3D medical-image segmentation networks.

    \b
    medcam demo                 phantom + demo model -> ./medcam-demo (NIfTI, PNG, Slicer scene, summary.json)
    medcam layers --model M     which layers can be explained, with output shapes and strides
    medcam explain INPUT -o OUT explain a case, image files, or a whole cohort (resumable, splittable, --ray)
    medcam evaluate INPUT -o OUT score methods x layers x targets with localisation/faithfulness/sanity metrics
    medcam report OUT           HTML report of an explain output folder (cohort table, 3D viewer per case)

    A map answers: which positions of the chosen layer's features raised the score
    S = sum over the target region of the target channel's logit. Run `medcam COMMAND --help` for details.
    """


# ---------------------------------------------------------------------------------------------------- layers
def _layer_rows(loaded: Any, example: Any) -> list[dict[str, Any]]:
    from .layers import auto_layer, list_layers

    infos = list_layers(loaded.net, example)
    try:
        auto: str | None = auto_layer(loaded.net, example)
    except MedcamError:  # the listing is still useful without an auto choice
        auto = None
    rows = []
    for i in infos:
        marks = (("auto", i.name == auto), ("default", i.name == loaded.default_layer), ("head", i.is_output))
        flags = [f for f, on in marks if on]
        if i.calls > 1:  # a reused module has no single activation: shown, but marked as not explainable
            flags.append(f"runs-{i.calls}x:not-explainable")
        rows.append({"name": i.name, "type": i.type, "shape": list(i.shape), "stride": list(i.stride), "flags": flags})
    return rows


@main.command("layers")
@model_options
@click.option(
    "--size",
    default=None,
    metavar="X,Y,Z",
    help="Spatial size of the example input (default: the model's window size, else 64,64,64).",
)
@click.option("--in-channels", type=int, default=None, help="Input channels (default: from the first convolution).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the layers as JSON.")
@command_errors
def layers_cmd(
    model_spec: str, checkpoint: str | None, size: str | None, in_channels: int | None, device: str, as_json: bool,
    quiet: bool,
) -> None:  # fmt: skip
    """List the layers you can explain, with output shapes and strides.

    One forward pass of a zero input; every module whose output is a feature map [B, K, *f] is listed in call
    order. `stride` = input size / feature size per axis. The layer medcam picks for `--layer auto` (the
    bottleneck: coarsest grid, most channels) is marked `auto`, the output head `head`, the model's default
    `default`. A module that runs more than once per forward pass (e.g. a residual block's activation applied
    twice) is marked `runs-Nx:not-explainable`: it has no single activation, choose its parent or another layer.
    Pass a name to `medcam explain --layer NAME`.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=3, desc="medcam layers", disable=quiet or as_json, leave=False)  # --json: for programs
    bar.set_postfix_str("importing torch")
    import torch

    from .pipeline import load_model, resolve_device

    bar.update(1)
    bar.set_postfix_str("loading the model")
    loaded = load_model(model_spec, checkpoint=checkpoint, device=resolve_device(device), weights=False)
    cin = in_channels or loaded.in_channels
    if cin is None:
        _fail("cannot tell the number of input channels; pass --in-channels")
    spatial = _ints(size, "--size") or loaded.roi_size or (64, 64, 64)
    example = torch.zeros((1, cin, *spatial), device=device)
    bar.update(1)
    bar.set_postfix_str(f"one forward pass of {tuple(example.shape)}")
    rows = _layer_rows(loaded, example)
    bar.update(1)
    bar.close()
    if as_json:
        click.echo(json.dumps({"input_shape": list(example.shape), "layers": rows}, indent=2))
        return
    w = max(len(r["name"]) for r in rows) if rows else 10
    click.echo(f"example input {tuple(example.shape)}; {len(rows)} candidate layers (call order):")
    click.echo(f"{'name':<{w}}  {'type':<22} {'output shape':<24} {'stride':<18} ")
    for r in rows:
        stride = "x".join(f"{s:g}" for s in r["stride"])
        click.echo(
            f"{r['name']:<{w}}  {r['type']:<22} {str(tuple(r['shape'])):<24} {stride:<18} {' '.join(r['flags'])}"
        )


# ---------------------------------------------------------------------------------------------------- explain
def _report(run: dict[str, Any], output: str) -> None:
    click.echo(
        f"medcam: {run['ok']} case(s) explained, {run['skipped']} skipped (already done), "
        f"{run['failed']} failed -> {output}  (run summary: {run['path']})"
    )
    for rec in run["cases"]:
        if rec["status"] == "failed":
            click.echo(f"  FAILED {rec['case_id']}: {rec['error']}")
    if run["ok"] + run["skipped"] == 1 and len(run["cases"]) == 1:
        cdir = Path(output) / run["cases"][0]["case_id"]
        click.echo(f"  summary: {cdir / 'summary.json'}")
        if (cdir / "slicer" / "scene.mrml").exists():
            click.echo(f"  3D Slicer: File > Open Data... > {cdir / 'slicer' / 'scene.mrml'} > OK")


@main.command("explain", epilog=EPILOG_EXPLAIN)
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@model_options
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="medcam-out",
    show_default=True,
    help="Output folder; one sub-folder per case.",
)
@method_option("hirescam", synth=True)
@click.option(
    "--layer",
    "-l",
    "layers",
    multiple=False,
    default=None,
    metavar="NAME",
    help="Layer to explain (`medcam layers` lists them) or 'auto' (bottleneck). [default: the model's default, demo: down_layers.3]",
)
@case_options
@window_options
@part_options
@click.option("--slicer/--no-slicer", default=True, show_default=True, help="Write the 3D Slicer folder.")
@click.option("--png/--no-png", default=True, show_default=True, help="Write PNG overlays and the montage.")
@click.option(
    "--shared-scale/--no-shared-scale",
    default=True,
    show_default=True,
    help="One colour scale per method, shared by its targets (never across methods; a map too faint for it gets its "
    "own); --no-shared-scale: each picture and montage panel on its own scale.",
)
@click.option(
    "--slice-at",
    default="roi",
    show_default=True,
    callback=lambda ctx, param, v: _slice_at(v),
    help="Slices of the PNGs, montage and viewer: through each target's ROI centre of mass (roi), each map's own "
    "maximum (max), or one RAS point in mm (x,y,z, e.g. -80,150,90).",
)
@click.option(
    "--report", is_flag=True, help="Write the HTML report OUTPUT/report/index.html at the end (medcam report)."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Redo cases that already have a folder and replace it (default: cases done with the same inputs and "
    "settings are skipped; a folder with other inputs or settings refuses the run before anything is written).",
)
@ray_options
@threads_option
@dicom_options
@nnunet_options
@command_errors
def explain_cmd(inputs: Sequence[str], output: str, quiet: bool, **kw: Any) -> None:
    """Explain a segmentation network on a case, image files, or a cohort.

    INPUTS is one BraTS case folder, one folder of case folders, one CSV manifest (header: case_id, then either
    `folder` or one column per channel, e.g. t1,t1ce,t2,flair[,seg]; relative paths are relative to the CSV), or
    image files that form ONE case (channels in the order given).

    Each case is preprocessed like the model expects (orientation, spacing, z-score), explained with every
    --method for every --target at --layer (with MONAI sliding windows if --roi-size), and the maps are mapped back
    onto the original image grid.

    With --model nnunet:FOLDER (an nnU-Net v2 model folder) INPUTS may also be nnU-Net's input layout (a folder of
    CASE_0000.nii.gz, CASE_0001.nii.gz, ... as nnUNetv2_predict -i takes it); cases are run and explained as
    nnU-Net runs them (its preprocessing, tiles, mirroring, --folds), targets name dataset.json labels/regions.
    """  # fmt: skip
    _check_number_options(kw)
    web = _Dicomweb(inputs, output, quiet, kw)
    inputs = web.fetch()
    _check_inputs_exist(inputs)
    _check_cases(inputs, kw)
    from .pipeline import explain_files

    want_report = kw.pop("report")
    nn_options = _nnunet_settings(kw)
    kw["layers"] = [kw["layers"]] if kw.get("layers") else []
    executor = run_executor(kw)  # checked before the inputs and the model
    settings = dataclasses.replace(run_settings(kw, quiet), **nn_options)
    run = explain_files(inputs, settings, output, executor=executor, **kw)
    _report(run, output)
    web.store_results(run)
    if want_report:
        _write_report(output)
    if run["failed"]:
        sys.exit(1)


def _nnunet_settings(kw: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~medcam.pipeline.RunSettings` fields of ``--folds``, ``--checkpoint-name``, ``--disable-tta``."""
    folds, checkpoint_name, mirroring = _nnunet_checkpoints(kw)
    return {"folds": folds, "checkpoint_name": checkpoint_name, "use_mirroring": mirroring}


def _nnunet_checkpoints(kw: dict[str, Any]) -> tuple[tuple[str, ...], str, bool]:
    """``--folds``, ``--checkpoint-name``, ``--disable-tta`` (popped from ``kw``): the checkpoints of an
    ``nnunet:FOLDER`` model and whether its predictor mirrors."""
    folds = tuple(f.strip() for f in str(kw.pop("folds")).split(",") if f.strip())
    if not folds:
        raise click.UsageError("--folds: give at least one fold, e.g. 0 or 0,1,2,3,4")
    return folds, str(kw.pop("checkpoint_name")), not kw.pop("disable_tta")


def _write_report(output: str) -> None:
    from .report import write_report

    index = write_report(output)
    click.echo(f"  report: {index} (open it in a browser; works offline, zip the whole folder to share)")


# ---------------------------------------------------------------------------------------------------- evaluate
_METRIC_GROUPS = "localisation, deletion, insertion, average_drop, road, sanity"


@main.command("evaluate", epilog=EPILOG_EVALUATE)
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@model_options
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default="medcam-eval",
    show_default=True,
    help="Output folder for metrics.csv, metrics.json and the plots.",
)
@method_option("gradcam,hirescam", synth=True)
@click.option(
    "--layer",
    "-l",
    "layers",
    multiple=True,
    metavar="NAME",
    help="Layer(s) to explain, repeatable, or 'auto'. [default: the model's default, demo: down_layers.3]",
)
@case_options
@window_options
@part_options
@click.option(
    "--reference",
    "-r",
    default="auto",
    show_default=True,
    metavar="REF",
    help="Reference mask of the localisation metrics: auto (the case's label region matching each target), "
    "TC|WT|ET, mask:FILE (original image grid), or none.",
)
@click.option(
    "--metrics",
    "metrics",
    multiple=True,
    metavar="NAMES",
    help=f"Metric groups, repeat or comma-separate: {_METRIC_GROUPS}; 'all' or 'default'. [default: localisation,deletion,insertion,average_drop]",
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
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the PNG plots.")
@click.option("--overwrite", is_flag=True, help="Replace existing metrics files in OUTPUT.")
@ray_options
@threads_option
@nnunet_options
@command_errors
def evaluate_cmd(inputs: Sequence[str], output: str, quiet: bool, **kw: Any) -> None:
    """Score CAM methods x layers x targets on a case, image files, or a cohort.

    INPUTS as for `medcam explain`: one BraTS case folder, one folder of case folders, a CSV manifest, or image
    files forming ONE case. Each case is preprocessed like the model expects, explained with every --method at
    every --layer for every --target, and every map is scored: localisation against --reference (energy pointing
    game, pointing game, Dice / IoU / HD95 in mm after --map-threshold, a threshold sweep), deletion / insertion
    AUC, average drop / increase in confidence, ROAD, and the cascading-randomisation sanity check (Spearman / SSIM;
    a dead, constant map counts as similarity 0). One row per (case, method, layer, target, metric).
    """
    _check_inputs_exist(inputs)
    _check_number_options(kw)
    _check_cases(inputs, kw)
    from .pipeline.evaluate import EvaluationOptions, evaluate_files

    try:
        percentiles = tuple(float(v) for v in _split_list([kw.pop("road_percentiles")]))
    except ValueError:
        raise click.BadParameter("--road-percentiles must be numbers like 10,50,90") from None
    options = EvaluationOptions(road_percentiles=percentiles, metrics=tuple(_split_list(kw.pop("metrics"))), **{
        k: kw.pop(k) for k in ("reference", "steps", "baseline", "map_threshold", "tolerance_mm", "batch_size",
                               "consensus", "sanity_steps", "plots", "hd95_convention", "insertion_protocol",
                               "tie_draws")
    })  # fmt: skip
    executor = run_executor(kw)  # checked before the inputs and the model
    settings = dataclasses.replace(run_settings(kw, quiet), **_nnunet_settings(kw))
    parts = {k: kw.pop(k) for k in ("num_parts", "part_id")}
    run = evaluate_files(inputs, settings, options, output, executor=executor, **parts)
    click.echo(
        f"medcam: evaluated {run['cases'] - len(run['failed'])} case(s), {len(run['result'].rows)} rows -> {run['paths']['csv']}"
    )
    if run["failed"]:
        shown = "; ".join(f"{c}: {m}" for c, m in run["failed"][:3])
        _fail(f"{len(run['failed'])} of {run['cases']} case(s) failed: {shown}")


# ---------------------------------------------------------------------------------------------------- report
@main.command("report")
@click.argument("output", type=click.Path())
@click.option(
    "--max-voxels",
    type=int,
    default=10_000_000,
    show_default=True,
    help="Volumes larger than this are subsampled (integer stride) in the report to keep it small.",
)
@command_errors
def report_cmd(output: str, max_voxels: int, quiet: bool) -> None:
    """Write OUTPUT/report/index.html: a cohort table and an interactive 3D viewer (NiiVue) per case.

    OUTPUT is the --output folder of `medcam explain`. The report opens from the file system (no server, no network)
    and can be zipped with the case folders.
    """
    from .report import write_report

    index = write_report(output, max_voxels=max_voxels, progress=not quiet)
    click.echo(f"medcam: report written -> {index}")


# ---------------------------------------------------------------------------------------------------- demo
@main.command("demo")
@click.option(
    "--output", "-o", type=click.Path(file_okay=False), default="medcam-demo", show_default=True, help="Output folder."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Phantom seed (tumour position/size).")
@click.option(
    "--method", "-M", "methods", multiple=True, metavar="NAME", help="CAM method(s). [default: gradcam,hirescam]"
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Regenerate the phantom and redo the explanation.")
@command_errors
def demo_cmd(output: str, seed: int, methods: Sequence[str], device: str, overwrite: bool, quiet: bool) -> None:
    """Generate a BraTS-like phantom, explain the demo model on it, write everything to OUTPUT.

    \b
    OUTPUT/input/Phantom_<seed>/       the phantom case (BraTS 2021 layout: _t1, _t1ce, _t2, _flair, _seg)
    OUTPUT/Phantom_<seed>/summary.json targets TC, WT, ET (predicted regions), scores, ROI sizes, timings
    OUTPUT/Phantom_<seed>/heatmaps/    Seg-Grad-CAM and Seg-HiRes-Grad-CAM maps (NIfTI, original grid)
    OUTPUT/Phantom_<seed>/overlays/    PNG overlays
    OUTPUT/Phantom_<seed>/slicer/      open scene.mrml in 3D Slicer
    OUTPUT/report/index.html           interactive report (open in a browser)
    Running it again reuses what is there (use --overwrite to redo).
    """  # fmt: skip
    from .data.brats import discover_brats_case
    from .data.phantoms import default_case_id, write_phantom_case
    from .models.demo import DEMO_SPACING_MM
    from .pipeline import RunSettings, explain_files

    out = Path(output)
    case_dir = out / "input" / default_case_id(seed, "brats2021")
    if case_dir.exists() and not overwrite:
        discover_brats_case(case_dir)  # a clear error if it is not a usable case
        logger.info("reusing phantom %s", case_dir)
    else:
        logger.info("writing phantom case %s", case_dir)
        write_phantom_case(
            out / "input", seed=seed, spacing_mm=DEMO_SPACING_MM, layout="brats2021", overwrite=overwrite
        )
    settings = RunSettings(
        methods=_split_list(methods) or ["gradcam", "hirescam"], overlap=0.25, sw_batch_size=1, blend="constant",
        device=device, overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    run = explain_files([str(case_dir)], settings, out)
    _report(run, str(out))
    if run["ok"] + run["skipped"]:
        _write_report(str(out))
    if run["failed"]:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
