"""``medcam`` command line: ``layers``, ``explain``, ``demo`` (and ``evaluate`` when :mod:`medcam.evaluation` has it).

Every command reports bad input (missing file, unknown layer or target, corrupt NIfTI, TorchScript model, ...) as ONE
line ``medcam: error: ...`` on stderr with exit code 1 (usage errors: click's message, exit code 2); ``--debug`` shows
the Python traceback instead. Progress bars (tqdm, on stderr) are silenced by ``--quiet``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger("medcam")

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
Output per case: OUT/<case_id>/summary.json, heatmaps/*.nii.gz (original grid), overlays/*.png, slicer/scene.mrml.
Resume: a case folder is skipped only if it records the same input files (path, size, modification time) and
settings; any other existing case folder refuses the whole run before anything is written (--overwrite redoes it).
Exit codes: 0 ok, 1 bad input or a failed case, 2 usage error, 130 Ctrl-C, 143 SIGTERM (the case in progress is
abandoned and its staging folder removed; run the same command to resume)."""


# ---------------------------------------------------------------------------------------------------- plumbing
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = " ".join(record.getMessage().split())
        level = record.levelname.lower()
        text = f"medcam: {level}: {msg}" if record.levelno >= logging.WARNING else f"medcam: {msg}"
        if record.exc_info:  # e.g. the traceback of a failed case, logged at DEBUG level (shown with --debug)
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging(quiet: bool, verbose: int, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_medcam", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._medcam = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("medcam").setLevel(level)
    # third-party warnings (deprecations in MONAI/torch) are noise on a command line; shown with -v
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if (verbose or debug) else logging.CRITICAL)
    if not (verbose or debug):
        warnings.simplefilter("ignore")


def _fail(msg: str) -> None:
    click.echo(f"medcam: error: {' '.join(str(msg).split())}", err=True)
    sys.exit(1)


def common_options(fn: Callable) -> Callable:
    """--quiet / --verbose / --debug on every command, and the one-line error policy."""

    @click.option("--quiet", "-q", is_flag=True, help="No progress bars, only errors.")
    @click.option("--verbose", "-v", count=True, help="More log messages (INFO; library warnings too).")
    @click.option("--debug", is_flag=True, help="Show the Python traceback of errors (and DEBUG logs).")
    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool, verbose: int, debug: bool, **kwargs: Any) -> Any:
        from .signals import exit_status, stop_on_signals

        _setup_logging(quiet, verbose, debug)
        try:
            with stop_on_signals():  # SIGTERM (cluster schedulers) like Ctrl-C: abandon the current case, clean up
                return fn(*args, quiet=quiet, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt as e:
            if debug:
                logger.debug("interrupted", exc_info=True)
            name = {130: "SIGINT (Ctrl-C)", 143: "SIGTERM"}.get(exit_status(e), f"signal {exit_status(e) - 128}")
            click.echo(
                f"medcam: interrupted by {name}: the case in progress was abandoned and its staging folder removed; "
                "finished cases are kept, run the same command to resume",
                err=True,
            )
            sys.exit(exit_status(e))
        except Exception as e:  # noqa: BLE001 - the one-line error policy
            if debug:
                raise
            from .errors import MedcamError

            known = isinstance(e, (MedcamError, ValueError, FileNotFoundError, FileExistsError, OSError))
            text = " ".join(str(e).split()) or type(e).__name__
            if not known:
                text = f"unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)"
            _fail(text)

    return wrapper


def _ints(text: str | None, what: str, n: int | None = 3) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        vals = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be integers like 96,96,96, got {text!r}") from None
    if len(vals) == 1 and n:
        vals = vals * n
    if n and len(vals) != n:
        raise click.BadParameter(f"{what} needs {n} integers, got {text!r}")
    return vals


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"{what} must be numbers like 2 or 1,1,2.5, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or min(vals) <= 0:
        raise click.BadParameter(f"{what} needs 1 or 3 positive numbers (mm), got {text!r}")
    return vals


def _split_list(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _device(name: str) -> str:
    from .pipeline import PipelineError, resolve_device

    try:
        return resolve_device(name)
    except PipelineError as e:
        _fail(str(e))


# ---------------------------------------------------------------------------------------------------- group
class _LazyGroup(click.Group):
    """A group whose heavy commands are imported when run, not when `medcam --help` lists them (start-up < 1.5 s)."""

    #: name -> (module, attribute, short help shown in `medcam --help`)
    lazy: dict[str, tuple[str, str, str]] = {
        "evaluate": (
            "medcam.evaluate_cli",
            "evaluate_command",
            "Score CAM methods x layers x targets on a case, image files, or a cohort.",
        )
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in self.lazy:
            return cmd
        import importlib

        module, attr, _ = self.lazy[name]
        cmd = getattr(importlib.import_module(module), attr)
        self.add_command(cmd, name)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from click.utils import make_default_short_help

        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None:
                rows.append((name, make_default_short_help(self.lazy[name][2], limit)))
            elif not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _MethodsOption(click.Option):
    """--method, whose help lists the registered methods: read when help is shown, so the import stays lazy."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from .methods import METHODS

        self.help = (
            f"CAM method(s), repeat or comma-separate: {', '.join(METHODS)} "
            "(gradcam = Seg-Grad-CAM, hirescam = Seg-HiRes-Grad-CAM). [default: hirescam]"
        )
        return super().get_help_record(ctx)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 118})
@click.version_option(package_name="medcam")
def main() -> None:
    """medcam: class activation maps (CAMs) for 3D medical-image segmentation networks.

    \b
    medcam demo                 phantom + demo model -> ./medcam-demo (NIfTI, PNG, Slicer scene, summary.json)
    medcam layers --model M     which layers can be explained, with output shapes and strides
    medcam explain INPUT -o OUT explain a case, image files, or a whole cohort (resumable, splittable)

    A map answers: which positions of the chosen layer's features raised the score
    S = sum over the target region of the target channel's logit. Run `medcam COMMAND --help` for details.
    """
    from .cpu_memory import keep_freed_memory

    keep_freed_memory()  # this process only: window after window reuses freed host memory (see medcam.cpu_memory)


def _model_options(fn: Callable) -> Callable:
    opts = [
        click.option(
            "--model",
            "-m",
            "model_spec",
            default="demo",
            show_default=True,
            metavar="MODEL",
            help="'demo' (built-in SegResNet, BraTS TC/WT/ET), 'package.module:function' or "
            "'file.py:function' (factory returning the network), or a MONAI bundle folder "
            "(configs/inference.json + models/model.pt).",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(dir_okay=False),
            default=None,
            help="state_dict file for a factory model (loaded with weights_only=True).",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


# ---------------------------------------------------------------------------------------------------- layers
@main.command("layers")
@_model_options
@click.option(
    "--size",
    default=None,
    metavar="X,Y,Z",
    help="Spatial size of the example input (default: the model's window size, else 64,64,64).",
)
@click.option("--in-channels", type=int, default=None, help="Input channels (default: from the first convolution).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the layers as JSON.")
@common_options
def layers_cmd(
    model_spec: str,
    checkpoint: str | None,
    size: str | None,
    in_channels: int | None,
    device: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """List the layers you can explain, with output shapes and strides.

    One forward pass of a zero input; every module whose output is a feature map [B, K, *f] is listed in call
    order. `stride` = input size / feature size per axis. The layer medcam picks for `--layer auto` (the
    bottleneck: coarsest grid, most channels) is marked `auto`, the output head `head`, the model's default
    `default`. A module that runs more than once per forward pass (e.g. a residual block's activation applied
    twice) is marked `runs-Nx:not-explainable`: it has no single activation, choose its parent or another layer.
    Pass a name to `medcam explain --layer NAME`.
    """
    import torch

    from .layers import auto_layer, list_layers
    from .pipeline import load_model

    loaded = load_model(model_spec, checkpoint=checkpoint, device=_device(device), weights=False)
    cin = in_channels or loaded.in_channels
    if cin is None:
        _fail("cannot tell the number of input channels; pass --in-channels")
    spatial = _ints(size, "--size") or loaded.roi_size or (64, 64, 64)
    example = torch.zeros((1, cin, *spatial), device=device)
    infos = list_layers(loaded.net, example)
    try:
        auto = auto_layer(loaded.net, example)
    except Exception:  # noqa: BLE001 - listing still useful without an auto choice
        auto = None
    rows = []
    for i in infos:
        flags = [
            f
            for f, on in (("auto", i.name == auto), ("default", i.name == loaded.default_layer), ("head", i.is_output))
            if on
        ]
        if i.calls > 1:  # a reused module has no single activation: shown, but marked as not explainable
            flags.append(f"runs-{i.calls}x:not-explainable")
        rows.append({"name": i.name, "type": i.type, "shape": list(i.shape), "stride": list(i.stride), "flags": flags})
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
def _explain_options(fn: Callable) -> Callable:
    opts = [
        click.option(
            "--output",
            "-o",
            type=click.Path(file_okay=False),
            default="medcam-out",
            show_default=True,
            help="Output folder; one sub-folder per case.",
        ),
        click.option(
            "--method",
            "-M",
            "methods",
            multiple=True,
            metavar="NAME",
            cls=_MethodsOption,
        ),
        click.option(
            "--target",
            "-t",
            "targets",
            multiple=True,
            metavar="SPEC",
            help="Region of interest to explain (repeatable). `ET` alone = the PREDICTED ET region; "
            "ET:class, TC:component=largest|N, mask:file.nii.gz[:REGION] (per case: mask:{folder}/{case}_seg.nii.gz), "
            "label:ET[:REGION] (the case's seg file), box:x0,y0,z0:x1,y1,z1[:REGION], channel:N[:mode]. "
            "[default: predicted region of each named output]",
        ),
        click.option(
            "--layer",
            "-l",
            default=None,
            metavar="NAME",
            help="Layer to explain (`medcam layers` lists them) or 'auto' (bottleneck). "
            "[default: the model's default, demo: down_layers.3]",
        ),
        click.option(
            "--regions", default=None, metavar="A,B,C", help="Names of the output channels in order (demo: TC,WT,ET)."
        ),
        click.option(
            "--activation",
            type=click.Choice(["sigmoid", "softmax", "none"]),
            default=None,
            help="The model's output activation (predicted regions); 'none' when the network ends in its own "
            "sigmoid/softmax, i.e. outputs probabilities. [default: sigmoid]",
        ),
        click.option(
            "--threshold",
            type=float,
            default=None,
            help="Probability threshold of predicted regions [default: 0.5 sigmoid, argmax softmax].",
        ),
        click.option(
            "--channel-order",
            default=None,
            metavar="M1,M2,M3,M4",
            help="Order of the BraTS modalities fed to the model, e.g. t1ce,t1,t2,flair for MONAI's "
            "brats_mri_segmentation bundle. [default: t1,t1ce,t2,flair]",
        ),
        click.option(
            "--spacing",
            default=None,
            metavar="MM",
            help="Resample to this voxel size (mm, 1 or 3 numbers) before the model. [demo: 2]",
        ),
        click.option(
            "--orientation",
            default=None,
            metavar="CODES",
            help="Reorient to these axis codes before the model, 'none' to keep. [default: RAS]",
        ),
        click.option(
            "--crop-foreground/--no-crop-foreground",
            default=None,
            help="Crop to the non-zero bounding box before the model (maps are mapped back). [demo: on]",
        ),
        click.option(
            "--normalize/--no-normalize",
            default=None,
            help="Z-score each channel over its non-zero voxels. [default: on]",
        ),
        click.option(
            "--divisible-by",
            type=int,
            default=None,
            help="Pad the preprocessed volume to a multiple of this (whole-image mode).",
        ),
        click.option(
            "--roi-size",
            default=None,
            metavar="X,Y,Z",
            help="Sliding-window size (voxels); 0 = whole image. [demo: 96,96,96; others: whole image]",
        ),
        click.option(
            "--overlap",
            type=float,
            default=None,
            help="Sliding-window overlap. [default: a bundle's inferer, else 0.25]",
        ),
        click.option(
            "--sw-batch-size",
            type=int,
            default=None,
            help="Windows per forward pass. [default: a bundle's inferer, else 1]",
        ),
        click.option(
            "--blend",
            type=click.Choice(["constant", "gaussian"]),
            default=None,
            help="Sliding-window blending, as MONAI's sliding_window_inference. "
            "[default: a bundle's inferer, else constant]",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--amp", is_flag=True, help="Mixed precision (autocast; bf16 on CPU). Maps are formed in fp32."),
        click.option(
            "--num-parts",
            type=int,
            default=1,
            show_default=True,
            help="Split the cohort into this many parts (one per machine/GPU).",
        ),
        click.option("--part-id", type=int, default=0, show_default=True, help="Which part this run does (0-based)."),
        click.option("--slicer/--no-slicer", default=True, show_default=True, help="Write the 3D Slicer folder."),
        click.option("--png/--no-png", default=True, show_default=True, help="Write PNG overlays."),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Redo cases that already have a folder and replace it (default: cases done with the same inputs "
            "and settings are skipped; a folder with other inputs or settings refuses the run before anything is "
            "written).",
        ),
        click.option(
            "--case-id",
            default=None,
            metavar="ID",
            help="Case id (output sub-folder) when INPUTS form one case. [default: the folder's name, or the first "
            "file's name unless it is a modality name like t1.nii.gz, then its folder's name]",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _run_explain(
    inputs: Sequence[str],
    *,
    model_spec: str,
    checkpoint: str | None,
    output: str,
    methods: Sequence[str],
    targets: Sequence[str],
    layer: str | None,
    regions: str | None,
    activation: str | None,
    threshold: float | None,
    channel_order: str | None,
    spacing: str | None,
    orientation: str | None,
    crop_foreground: bool | None,
    normalize: bool | None,
    divisible_by: int | None,
    roi_size: str | None,
    overlap: float | None,
    sw_batch_size: int | None,
    blend: str | None,
    device: str,
    amp: bool,
    num_parts: int,
    part_id: int,
    slicer: bool,
    png: bool,
    overwrite: bool,
    quiet: bool,
    case_id: str | None = None,
) -> dict[str, Any]:
    for p in inputs:  # the commonest mistake, reported before torch is imported (about 2 s)
        if not Path(p).exists():
            _fail(f"input '{p}' does not exist")
    from .methods import METHODS
    from .pipeline import (
        default_targets,
        discover_cases,
        explain_cohort,
        load_model,
        make_inferer,
        parse_targets,
        sliding_settings,
        split_parts,
    )

    method_list = _split_list(methods) or ["hirescam"]
    unknown = [m for m in method_list if m.lower() not in METHODS]
    if unknown:
        _fail(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    method_list = list(dict.fromkeys(m.lower() for m in method_list))
    if threshold is not None and not 0 < threshold < 1:
        _fail(f"--threshold must be a probability in (0, 1), got {threshold}")
    dev = _device(device)
    pre: dict[str, Any] = {}
    if spacing is not None:
        pre["spacing"] = _floats(spacing, "--spacing")
    if orientation is not None:
        pre["orientation"] = None if orientation.lower() == "none" else orientation.upper()
    if crop_foreground is not None:
        pre["crop_foreground"] = crop_foreground
    if normalize is not None:
        pre["normalize"] = normalize
    if divisible_by is not None:
        pre["divisible_by"] = divisible_by
    roi = None
    if roi_size is not None:
        roi = () if roi_size.strip() in ("0", "none") else _ints(roi_size, "--roi-size")
    order = [c.strip().lower() for c in channel_order.split(",")] if channel_order else None
    region_names = [r.strip() for r in regions.split(",") if r.strip()] if regions else None

    # everything that can be checked before the first case: inputs, parts, model, targets, layer
    cases = discover_cases(inputs, case_id=case_id)
    split_parts(cases, num_parts, part_id)
    loaded = load_model(
        model_spec,
        checkpoint=checkpoint,
        device=dev,
        regions=region_names,
        activation=activation,
        channel_order=order,
        preprocessing=pre,
        roi_size=roi,
        layer=layer,
    )
    specs = parse_targets(targets, loaded.regions) if targets else default_targets(loaded.regions)
    layer_name = layer or loaded.default_layer
    if layer_name != "auto":
        _check_layer_before_cases(loaded, layer_name, dev)
    sw = sliding_settings(loaded.sliding, overlap=overlap, sw_batch_size=sw_batch_size, mode=blend)
    inferer = make_inferer(loaded.roi_size, **sw, progress=False)
    settings = {
        "model": loaded.describe(),
        "methods": method_list,
        "targets": [s.text for s in specs],
        "layer": layer_name,
        "sliding_window": None if inferer is None else {"roi_size": list(loaded.roi_size), **sw},
        "threshold": threshold,
        "amp": amp,
        "slicer": slicer,
        "png": png,
    }
    return explain_cohort(
        cases,
        loaded,
        method_list,
        specs,
        layer_name,
        inferer,
        output,
        num_parts=num_parts,
        part_id=part_id,
        device=dev,
        amp=amp,
        threshold=threshold,
        overwrite=overwrite,
        slicer=slicer,
        png=png,
        progress=not quiet,
        settings=settings,
    )


def _check_layer_before_cases(loaded: Any, layer_name: str, device: str) -> None:
    """Unknown layers and layers that run more than once per forward fail here, before any case is loaded.

    The second check runs one no-grad forward of a zero input of the window size (at most 96 per axis; 64^3 without a
    window); a network that cannot run on it is left to the per-case checks."""
    import torch

    from .errors import ModelError
    from .layers import check_layer_runs_once, resolve_layer

    resolve_layer(loaded.net, layer_name)
    if loaded.in_channels is None:
        return
    size = tuple(min(int(v), 96) for v in (loaded.roi_size or (64, 64, 64)))  # 96: divisible by strides <= 32
    example = torch.zeros((1, loaded.in_channels, *size), device=device)
    try:
        check_layer_runs_once(loaded.net.to(device), layer_name, example)
    except ModelError as e:
        logger.debug("layer check skipped: the network does not run on %s (%s)", tuple(example.shape), e)


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
@_model_options
@_explain_options
@common_options
def explain_cmd(inputs: Sequence[str], **kw: Any) -> None:
    """Explain a segmentation network on a case, image files, or a cohort.

    INPUTS is one BraTS case folder, one folder of case folders, one CSV manifest (header: case_id, then either
    `folder` or one column per channel, e.g. t1,t1ce,t2,flair[,seg]; relative paths are relative to the CSV), or
    image files that form ONE case (channels in the order given).

    Each case is preprocessed like the model expects (orientation, spacing, z-score), explained with every
    --method for every --target at --layer (with MONAI sliding windows if --roi-size), and the maps are mapped back
    onto the original image grid.
    """
    run = _run_explain(inputs, **kw)
    _report(run, kw["output"])
    if run["failed"]:
        sys.exit(1)


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
@common_options
def demo_cmd(output: str, seed: int, methods: Sequence[str], device: str, overwrite: bool, quiet: bool) -> None:
    """Generate a BraTS-like phantom, explain the demo model on it, write everything to OUTPUT.

    \b
    OUTPUT/input/Phantom_<seed>/       the phantom case (BraTS 2021 layout: _t1, _t1ce, _t2, _flair, _seg)
    OUTPUT/Phantom_<seed>/summary.json targets TC, WT, ET (predicted regions), scores, ROI sizes, timings
    OUTPUT/Phantom_<seed>/heatmaps/    Seg-Grad-CAM and Seg-HiRes-Grad-CAM maps (NIfTI, original grid)
    OUTPUT/Phantom_<seed>/overlays/    PNG overlays
    OUTPUT/Phantom_<seed>/slicer/      open scene.mrml in 3D Slicer
    Running it again reuses what is there (use --overwrite to redo).
    """
    from .data.brats import discover_brats_case
    from .data.phantoms import default_case_id, write_phantom_case
    from .models.demo import DEMO_SPACING_MM

    out = Path(output)
    cid = default_case_id(seed, "brats2021")
    case_dir = out / "input" / cid
    if case_dir.exists() and not overwrite:
        discover_brats_case(case_dir)  # a clear error if it is not a usable case
        logger.info("reusing phantom %s", case_dir)
    else:
        logger.info("writing phantom case %s", case_dir)
        write_phantom_case(
            out / "input", seed=seed, spacing_mm=DEMO_SPACING_MM, layout="brats2021", overwrite=overwrite
        )
    run = _run_explain(
        [str(case_dir)],
        model_spec="demo",
        checkpoint=None,
        output=str(out),
        methods=list(methods) or ["gradcam", "hirescam"],
        targets=(),
        layer=None,
        regions=None,
        activation=None,
        threshold=None,
        channel_order=None,
        spacing=None,
        orientation=None,
        crop_foreground=None,
        normalize=None,
        divisible_by=None,
        roi_size=None,
        overlap=0.25,
        sw_batch_size=1,
        blend="constant",
        device=device,
        amp=False,
        num_parts=1,
        part_id=0,
        slicer=True,
        png=True,
        overwrite=overwrite,
        quiet=quiet,
    )
    _report(run, str(out))
    if run["failed"]:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------- evaluate
def _register_optional() -> None:
    """Register ``evaluate`` now (it is otherwise imported when first used, see :class:`_LazyGroup`)."""
    from .evaluation import evaluate_command  # type: ignore[attr-defined]

    if isinstance(evaluate_command, click.Command):
        main.add_command(evaluate_command, "evaluate")


if __name__ == "__main__":  # pragma: no cover
    main()
