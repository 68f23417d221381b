"""The functions behind the ``medcam`` command line: load a model, parse target specs, explain cases and cohorts.

Everything here is usable from Python too::

    from medcam.pipeline import load_model, parse_targets, load_case, explain_case

    loaded = load_model("demo")                                   # or "pkg.module:factory", or a bundle folder
    case = load_case("BraTS2021_00000/", loaded)                  # preprocessed with the model's settings
    specs = parse_targets(["ET", "WT:class", "TC:component=largest"], loaded.regions)
    summary = explain_case(case, loaded, ["hirescam"], specs, out_dir="out/BraTS2021_00000")

Per case the output folder holds (all written atomically; an existing case folder is never overwritten unless
``overwrite=True``)::

    <case>/summary.json                    targets, ROI voxel counts, scores, layer, timings, versions
    <case>/heatmaps/<method>_<target>.nii.gz  float32 maps on the ORIGINAL image grid (shape + affine of the input)
    <case>/overlays/<method>_<target>.png  axial/coronal/sagittal overlays (preprocessed grid) with the ROI contour
    <case>/slicer/scene.mrml ...           self-contained 3D Slicer folder (see :mod:`medcam.io.slicer`)

Target specs (``parse_target``), for a model whose output channels are named by ``regions`` (demo/BraTS:
TC = 0, WT = 1, ET = 2, sigmoid outputs):

* ``ET`` or ``ET:predicted`` - the voxels the model predicts as ET (``sigmoid(y) > threshold``), score on logits;
* ``ET:class`` - every voxel of the ET channel (the original Seg-Grad-CAM target);
* ``ET:component=largest`` / ``ET:component=2`` - one connected component of the predicted ET region, ``N`` = rank by
  size starting at 1 (1 = largest);
* ``mask:lesion.nii.gz[:WT]`` - a binary mask (non-zero = ROI) given ON THE ORIGINAL IMAGE GRID (same shape and
  affine as the input images); it is mapped to the preprocessed grid by MONAI ``ResampleToMatch`` with
  nearest-neighbour interpolation, i.e. the geometry of the case's own preprocessing. Region default: WT when the
  model has such a region, else the model must have a single output channel;
* ``box:x0,y0,z0:x1,y1,z1[:WT]`` - a box of voxel indices of the ORIGINAL grid, ``x0 <= i < x1`` (half-open), mapped
  like a mask;
* ``channel:N[:predicted|class|component=...]`` - the same by output channel number, for any model.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import MedcamError, ModelError, TargetError
from .targets import ClassROI, ComponentROI, MaskROI, PredictedROI, Target

__all__ = [
    "LoadedModel",
    "TargetSpec",
    "CaseSource",
    "PipelineError",
    "METHOD_LABELS",
    "load_model",
    "parse_target",
    "parse_targets",
    "default_targets",
    "build_targets",
    "discover_cases",
    "load_case",
    "make_inferer",
    "predict",
    "explain_case",
    "explain_cohort",
    "split_parts",
    "versions",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: display names of the methods in :data:`medcam.METHODS`
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Seg-Grad-CAM",
    "hirescam": "Seg-HiRes-Grad-CAM",
    "xgradcam": "Seg-XGrad-CAM",
    "gradcam++": "Seg-Grad-CAM++",
    "layercam": "Seg-LayerCAM",
}
SUMMARY_NAME = "summary.json"
#: BraTS modality used as overlay background per region (ET/TC are seen on T1ce, the oedema of WT on FLAIR)
_OVERLAY_CHANNEL = {"ET": "t1ce", "TC": "t1ce", "WT": "flair"}


class PipelineError(MedcamError):
    """Bad command-line level input: unknown model spec, unreadable manifest, output folder conflicts..."""


# ====================================================================================================== models
@dataclass
class LoadedModel:
    """A network ready to explain, with what the pipeline needs to know about it.

    Attributes:
        net: the eager ``nn.Module`` (eval mode) mapping ``[B, Cin, *S]`` to ``[B, C, *S]`` logits.
        kind: ``"demo"``, ``"factory"`` or ``"bundle"``.
        spec: the ``--model`` string as given.
        checkpoint: weights file loaded, or None.
        regions: names of the C output channels (e.g. ``("TC", "WT", "ET")``), or ``()`` when unknown.
        activation: the model's output activation, ``"sigmoid"`` (multi-label) or ``"softmax"``.
        channel_order: BraTS modality order of the input channels (used when the input is a BraTS case).
        preprocessing: keyword arguments for ``load_brats_case`` / ``load_volumes`` (orientation, spacing mm, ...).
        default_layer: layer explained when none is given (``"auto"`` = the bottleneck).
        roi_size: default sliding-window size, or None for whole-image explanation.
        in_channels: number of input channels if known.
    """

    net: nn.Module
    kind: str
    spec: str
    checkpoint: str | None = None
    regions: tuple[str, ...] = ()
    activation: str = "sigmoid"
    channel_order: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
    preprocessing: dict[str, Any] = field(default_factory=dict)
    default_layer: str = "auto"
    roi_size: tuple[int, ...] | None = None
    in_channels: int | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for ``summary.json``."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "checkpoint": self.checkpoint,
            "class": type(self.net).__name__,
            "parameters": int(sum(p.numel() for p in self.net.parameters())),
            "regions": list(self.regions),
            "activation": self.activation,
            "channel_order": list(self.channel_order),
            "preprocessing": _jsonable(self.preprocessing),
        }


def _first_conv_channels(net: nn.Module) -> int | None:
    conv = next((m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return None if conv is None else int(conv.in_channels)


def _is_torchscript_archive(path: Path) -> bool:
    """True for a ``torch.jit.save`` archive (a zip holding ``constants.pkl`` / ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


_TORCHSCRIPT_HINT = (
    "is a TorchScript file; medcam needs the eager network to attach hooks. Build it in Python and load the "
    "weights: --model your_package.module:build_network --checkpoint weights.pt (a state_dict), or point --model at "
    "a MONAI bundle folder (configs/inference.json + models/model.pt)"
)


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint holding a ``state_dict`` (plain, or under ``state_dict``/``model``/``network``).

    ``torch.load(weights_only=True)``: no code from the file is executed. A ``module.`` prefix (DataParallel) is
    stripped.

    Raises:
        ModelError: missing/unreadable file, TorchScript archive, pickled module, no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    if _is_torchscript_archive(path):
        raise ModelError(f"checkpoint '{path}' {_TORCHSCRIPT_HINT}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot read checkpoint '{path}' as a state_dict ({type(e).__name__}: {first[:200]}); medcam loads "
            "weights only (torch.save(model.state_dict(), path)), never pickled modules"
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "network", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint '{path}' holds no state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = set(net.state_dict())
        missing = sorted(own - set(state))[:3]
        unexpected = sorted(set(state) - own)[:3]
        detail = f"missing keys {missing}, unexpected keys {unexpected}" if missing or unexpected else (
            str(e).strip().splitlines()[-1].strip()[:200])
        raise ModelError(f"weights in '{source}' do not fit the network {type(net).__name__}: {detail}") from e


def _import_factory(spec: str) -> Callable[[], Any]:
    """``pkg.module:function`` or ``path/to/file.py:function`` -> the callable."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name or not fn_name.isidentifier():
        raise PipelineError(f"--model {spec!r}: expected 'demo', 'package.module:function', 'file.py:function' or a "
                            "MONAI bundle folder")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise PipelineError(f"--model {spec!r}: file '{path}' does not exist")
            mspec = importlib.util.spec_from_file_location(f"medcam_factory_{path.stem}", path)
            module = importlib.util.module_from_spec(mspec)
            assert mspec.loader is not None
            mspec.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except PipelineError:
        raise
    except ImportError as e:
        raise PipelineError(f"--model {spec!r}: cannot import module {mod_name!r} ({e})") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise PipelineError(f"--model {spec!r}: importing {mod_name!r} failed ({type(e).__name__}: {e})") from e
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise PipelineError(f"--model {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return fn


def _check_eager(net: Any, what: str) -> nn.Module:
    if isinstance(net, torch.jit.ScriptModule):
        raise ModelError(f"{what} {_TORCHSCRIPT_HINT}")
    if not isinstance(net, nn.Module):
        raise ModelError(f"{what} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _load_bundle(folder: Path) -> tuple[nn.Module, str]:
    """Instantiate ``network_def`` of ``configs/inference.json`` and load ``models/model.pt`` (no download)."""
    cfg = next((folder / "configs" / n for n in ("inference.json", "inference.yaml", "inference.yml")
                if (folder / "configs" / n).is_file()), None)
    if cfg is None:
        raise PipelineError(f"'{folder}' is not a MONAI bundle: configs/inference.json is missing")
    weights = folder / "models" / "model.pt"
    if not weights.is_file():
        ts = folder / "models" / "model.ts"
        hint = f" (only models/model.ts, which {_TORCHSCRIPT_HINT.removeprefix('is ')})" if ts.is_file() else ""
        raise PipelineError(f"MONAI bundle '{folder}' has no models/model.pt{hint}")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(folder.resolve())
        key = "network_def" if "network_def" in parser.get() else ("network" if "network" in parser.get() else None)
        if key is None:
            raise PipelineError(f"bundle config '{cfg}' defines no 'network_def'")
        net = parser.get_parsed_content(key, instantiate=True)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - MONAI raises many types for bad configs
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PipelineError(f"cannot build 'network_def' from '{cfg}' ({type(e).__name__}: {first[:200]})") from e
    net = _check_eager(net, f"bundle '{folder}' network_def")
    _load_weights(net, load_state_dict_file(weights), str(weights))
    return net, str(weights)


def load_model(
    spec: str = "demo",
    *,
    checkpoint: PathLike | None = None,
    device: str | torch.device = "cpu",
    regions: Sequence[str] | None = None,
    activation: str | None = None,
    channel_order: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    roi_size: Sequence[int] | None = None,
    layer: str | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load the network to explain.

    Args:
        spec: ``"demo"`` (the shipped SegResNet, :mod:`medcam.models.demo`), ``"pkg.module:function"`` or
            ``"file.py:function"`` (a factory called without arguments that returns the eager ``nn.Module``), or a
            MONAI bundle folder (``configs/inference.json`` whose ``network_def`` is instantiated with
            ``monai.bundle.ConfigParser``, weights from ``models/model.pt``). Nothing is downloaded.
        checkpoint: ``state_dict`` file for a factory model (``torch.load(weights_only=True)``).
        device: where to put the network.
        regions: names of the output channels (default: demo/BraTS ``TC, WT, ET`` for the demo, none otherwise).
        activation: ``"sigmoid"`` or ``"softmax"`` (default sigmoid).
        channel_order: BraTS modality order of the input channels (default T1, T1ce, T2, FLAIR; MONAI's
            brats_mri_segmentation bundle needs ``("t1ce", "t1", "t2", "flair")``).
        preprocessing: overrides of the ``load_brats_case``/``load_volumes`` keyword arguments.
        roi_size: sliding-window size (demo default :data:`~medcam.models.demo.DEMO_ROI_SIZE`; else whole image).
        layer: default layer (demo default :data:`~medcam.models.demo.DEMO_LAYER`; else ``"auto"``).
        weights: False builds the demo architecture without loading weights (for ``medcam layers``).

    Returns:
        :class:`LoadedModel` with the network in eval mode on ``device``.

    Raises:
        PipelineError / ModelError: with a one-line reason (missing file, TorchScript, bad factory, key mismatch).
    """
    if activation is not None and activation not in ("sigmoid", "softmax"):
        raise PipelineError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    pre: dict[str, Any] = {"orientation": "RAS", "spacing": None, "normalize": True, "crop_foreground": False,
                           "divisible_by": None}
    spec = str(spec)
    if spec == "demo":
        from .models import demo

        if checkpoint is not None:
            net = _check_eager(demo.demo_network(), "demo")
            _load_weights(net, load_state_dict_file(checkpoint), str(checkpoint))
            ckpt = str(checkpoint)
        elif weights:
            try:
                net = demo.load_demo_model("cpu")
            except FileNotFoundError as e:
                raise ModelError(str(e)) from e
            ckpt = f"medcam.models.weights/{demo.DEMO_WEIGHTS}"
        else:
            net, ckpt = demo.demo_network(), None
        pre.update(demo.demo_preprocessing_kwargs())
        # the brain fits in one window once cropped to its bounding box: several times faster, same maps
        pre["crop_foreground"] = True
        loaded = LoadedModel(
            net=net, kind="demo", spec=spec, checkpoint=ckpt, regions=tuple(demo.DEMO_REGIONS), activation="sigmoid",
            channel_order=tuple(demo.DEMO_CHANNELS), default_layer=demo.DEMO_LAYER,
            roi_size=tuple(demo.DEMO_ROI_SIZE), in_channels=len(demo.DEMO_CHANNELS),
        )
    elif Path(spec).is_dir():
        if checkpoint is not None:
            raise PipelineError("--checkpoint is for factory models; a bundle's weights are its models/model.pt")
        net, ckpt = _load_bundle(Path(spec))
        loaded = LoadedModel(net=net, kind="bundle", spec=spec, checkpoint=ckpt)
    elif Path(spec).is_file():
        if _is_torchscript_archive(Path(spec)):
            raise ModelError(f"--model '{spec}' {_TORCHSCRIPT_HINT}")
        raise PipelineError(
            f"--model '{spec}' is a file; give the network as 'package.module:function' (or 'file.py:function') and "
            "the weights with --checkpoint, or a MONAI bundle folder"
        )
    elif ":" in spec:
        factory = _import_factory(spec)
        try:
            net = factory()
        except Exception as e:  # noqa: BLE001 - the user's factory failed
            raise PipelineError(f"--model {spec!r}: calling the factory failed ({type(e).__name__}: {e})") from e
        net = _check_eager(net, f"--model {spec!r}")
        ckpt = None
        if checkpoint is not None:
            _load_weights(net, load_state_dict_file(checkpoint), str(checkpoint))
            ckpt = str(checkpoint)
        else:
            logger.warning("no --checkpoint given: explaining %s with the weights its factory returned", spec)
        loaded = LoadedModel(net=net, kind="factory", spec=spec, checkpoint=ckpt)
    else:
        raise PipelineError(
            f"--model {spec!r} not found: expected 'demo', 'package.module:function', 'file.py:function' or a MONAI "
            "bundle folder (configs/inference.json + models/model.pt)"
        )
    loaded.preprocessing = pre
    if preprocessing:
        unknown = set(preprocessing) - set(pre)
        if unknown:
            raise PipelineError(f"unknown preprocessing options {sorted(unknown)}; use {sorted(pre)}")
        loaded.preprocessing.update({k: v for k, v in preprocessing.items()})
    if regions is not None:
        loaded.regions = tuple(str(r) for r in regions)
    if activation is not None:
        loaded.activation = activation
    if channel_order is not None:
        loaded.channel_order = tuple(str(c).lower() for c in channel_order)
    if roi_size is not None:
        loaded.roi_size = tuple(int(s) for s in roi_size) or None
    if layer is not None:
        loaded.default_layer = layer
    if loaded.in_channels is None:
        loaded.in_channels = _first_conv_channels(loaded.net)
    loaded.net = loaded.net.to(device).eval()
    return loaded


# ====================================================================================================== targets
@dataclass(frozen=True)
class TargetSpec:
    """A parsed ``--target``.

    Attributes:
        text: the spec as given.
        kind: ``"predicted"``, ``"class"``, ``"component"``, ``"mask"`` or ``"box"``.
        channel: output channel.
        region: the channel's name (``"ET"``) or ``"ch<N>"``.
        rank: component rank (1 = largest) for ``"component"``.
        path: mask file (ORIGINAL image grid) for ``"mask"``.
        box: ``((x0, y0, z0), (x1, y1, z1))`` voxel indices of the ORIGINAL grid, half-open, for ``"box"``.
    """

    text: str
    kind: str
    channel: int
    region: str
    rank: int | None = None
    path: str | None = None
    box: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def name(self) -> str:
        """File-name-safe short name: ``ET``, ``ET-class``, ``ET-component1``, ``mask-lesion-WT``, ``box-WT``."""
        if self.kind == "predicted":
            return self.region
        if self.kind == "class":
            return f"{self.region}-class"
        if self.kind == "component":
            return f"{self.region}-component{self.rank}"
        if self.kind == "mask":
            from .data.loading import strip_image_suffix

            stem = re.sub(r"[^A-Za-z0-9]+", "", strip_image_suffix(Path(str(self.path)).name))[:20] or "roi"
            return f"mask-{stem}-{self.region}"
        return f"box-{self.region}"


def _channel_of(token: str, regions: Sequence[str], spec: str) -> tuple[int, str]:
    lower = [r.lower() for r in regions]
    if token.lower() in lower:
        i = lower.index(token.lower())
        return i, regions[i]
    m = re.fullmatch(r"(?:channel[:=]?|ch)(\d+)", token.strip(), flags=re.IGNORECASE)
    if m:
        i = int(m.group(1))
        if regions and i >= len(regions):
            raise TargetError(f"--target {spec!r}: channel {i} is out of range for regions {', '.join(regions)}")
        return i, regions[i] if regions else f"ch{i}"
    names = ", ".join(regions) if regions else "none (this model's regions are unnamed; pass --regions)"
    raise TargetError(
        f"--target {spec!r}: unknown region {token!r}; known regions: {names}; or use channel:N"
    )


def _default_region(regions: Sequence[str], spec: str) -> tuple[int, str]:
    if "WT" in regions:
        return regions.index("WT"), "WT"
    if len(regions) == 1:
        return 0, regions[0]
    raise TargetError(f"--target {spec!r}: say which output region the ROI is on, e.g. {spec}:{regions[0] if regions else 'channel:0'}")


def parse_target(spec: str, regions: Sequence[str] = ()) -> TargetSpec:
    """Parse one ``--target`` string (grammar in the module docstring).

    Args:
        spec: e.g. ``"ET"``, ``"WT:predicted"``, ``"TC:component=largest"``, ``"ET:class"``, ``"channel:2"``,
            ``"mask:roi.nii.gz:WT"``, ``"box:10,20,30:40,50,60:ET"``.
        regions: names of the model's output channels, in order.

    Raises:
        TargetError: unknown region name, bad mode, bad box, missing mask file.
    """
    text = spec.strip()
    if not text:
        raise TargetError("--target is empty; e.g. --target ET")
    regions = tuple(regions)
    head = text.split(":", 1)[0].lower()
    if head == "mask":
        rest = text[5:]
        region_token = None
        if ":" in rest:
            path_part, last = rest.rsplit(":", 1)
            if last and not last.lower().endswith((".nii", ".gz", ".nrrd", ".mha", ".mhd")):
                rest, region_token = path_part, last
        if not rest:
            raise TargetError(f"--target {spec!r}: give the mask file, e.g. mask:lesion.nii.gz:WT")
        if not Path(rest).exists():
            raise TargetError(f"--target {spec!r}: mask file '{rest}' does not exist")
        ch, reg = _channel_of(region_token, regions, spec) if region_token else _default_region(regions, spec)
        return TargetSpec(text, "mask", ch, reg, path=str(rest))
    if head == "box":
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise TargetError(f"--target {spec!r}: expected box:x0,y0,z0:x1,y1,z1[:REGION]")
        try:
            start = tuple(int(v) for v in parts[1].split(","))
            stop = tuple(int(v) for v in parts[2].split(","))
        except ValueError as e:
            raise TargetError(f"--target {spec!r}: box corners must be integers, e.g. box:10,20,30:40,50,60:WT") from e
        if len(start) != 3 or len(stop) != 3 or any(a < 0 or a >= b for a, b in zip(start, stop)):
            raise TargetError(f"--target {spec!r}: need 3 integers per corner with 0 <= x0 < x1 (half-open box)")
        ch, reg = _channel_of(parts[3], regions, spec) if len(parts) == 4 else _default_region(regions, spec)
        return TargetSpec(text, "box", ch, reg, box=(start, stop))
    # REGION[:mode] or channel:N[:mode]
    parts = text.split(":")
    if parts[0].lower() == "channel":
        if len(parts) < 2 or not parts[1].isdigit():
            raise TargetError(f"--target {spec!r}: expected channel:N[:predicted|class|component=largest|N]")
        token, modes = f"ch{parts[1]}", parts[2:]
    else:
        token, modes = parts[0], parts[1:]
    ch, reg = _channel_of(token, regions, spec)
    if len(modes) > 1:
        raise TargetError(f"--target {spec!r}: too many ':' parts; e.g. ET, ET:class, ET:component=largest")
    mode = modes[0].strip().lower() if modes else "predicted"
    if mode == "predicted":
        return TargetSpec(text, "predicted", ch, reg)
    if mode == "class":
        return TargetSpec(text, "class", ch, reg)
    m = re.fullmatch(r"component(?:=(largest|\d+))?", mode)
    if m:
        val = m.group(1) or "largest"
        rank = 1 if val == "largest" else int(val)
        if rank < 1:
            raise TargetError(f"--target {spec!r}: component ranks start at 1 (1 = largest)")
        return TargetSpec(text, "component", ch, reg, rank=rank)
    raise TargetError(
        f"--target {spec!r}: unknown mode {modes[0]!r}; use predicted, class, component=largest or component=N"
    )


def parse_targets(specs: Iterable[str], regions: Sequence[str] = ()) -> list[TargetSpec]:
    """Parse several specs; duplicates are refused (they would write the same files)."""
    out = [parse_target(s, regions) for s in specs]
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TargetError(f"targets {dup} are given twice (or map to the same output name)")
    if not out:
        raise TargetError("no targets given: pass e.g. --target ET")
    return out


def default_targets(regions: Sequence[str]) -> list[TargetSpec]:
    """The predicted region of every named output channel (demo: TC, WT, ET)."""
    if not regions:
        raise TargetError("no --target given and the model's output channels are unnamed: pass --target channel:N "
                          "or name the channels with --regions")
    return parse_targets(list(regions), regions)


def _mask_on_case_grid(case: Any, spec: TargetSpec) -> np.ndarray:
    """A mask/box given on the ORIGINAL grid -> float32 0/1 ``[X', Y', Z']`` on the preprocessed grid."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    from .data.loading import check_same_grid, read_header, read_volume

    ref = read_header(case.reference_path)
    if spec.kind == "mask":
        hdr = read_header(spec.path)
        try:
            check_same_grid([ref, hdr])
        except Exception as e:
            raise TargetError(
                f"--target {spec.text!r}: the mask must be on the original image grid of case {case.case_id} "
                f"(shape {ref.shape}, same affine as '{ref.path.name}'); got shape {hdr.shape}"
                + ("" if hdr.shape != ref.shape else " with a different affine")
            ) from e
        vol = read_volume(spec.path, is_label=True)
        arr = (vol.as_tensor() != 0).float()[None]
        if not bool(arr.any()):
            raise TargetError(f"--target {spec.text!r}: the mask is empty (all zero)")
    else:
        start, stop = spec.box
        if any(b > s for b, s in zip(stop, ref.shape)):
            raise TargetError(f"--target {spec.text!r}: box stop {stop} lies outside the image grid {ref.shape}")
        box = np.zeros(ref.shape, np.float32)
        box[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
        arr = torch.from_numpy(box)[None]
    src = MetaTensor(arr, affine=torch.as_tensor(np.asarray(case.original_affine, float)))
    dst = MetaTensor(case.image[:1].as_tensor(), affine=case.image.affine)
    out = ResampleToMatch(mode="nearest", padding_mode="zeros")(src, img_dst=dst)
    res = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out)[0].astype(np.float32)
    if not res.any():
        raise TargetError(f"--target {spec.text!r}: the ROI falls outside the preprocessed field of view")
    return res


def build_targets(specs: Sequence[TargetSpec], case: Any, *, activation: str = "sigmoid",
                  threshold: float | None = None) -> list[Target]:
    """Targets for ``case`` (masks and boxes resampled onto ``case.image``'s grid).

    Returns:
        one :class:`~medcam.targets.Target` per spec, in order.
    """
    out: list[Target] = []
    for s in specs:
        if s.kind == "predicted":
            out.append(PredictedROI(s.channel, activation=activation, threshold=threshold))
        elif s.kind == "class":
            out.append(ClassROI(s.channel))
        elif s.kind == "component":
            out.append(ComponentROI(s.channel, which=int(s.rank) - 1, activation=activation, threshold=threshold))
        else:
            out.append(MaskROI(_mask_on_case_grid(case, s), s.channel))
    return out


# ====================================================================================================== inputs
@dataclass(frozen=True)
class CaseSource:
    """Where one case comes from.

    Attributes:
        case_id: identifier (output sub-folder name).
        kind: ``"brats_folder"``, ``"brats_mapping"`` or ``"volumes"``.
        source: folder path, modality -> path mapping, or list of channel files.
    """

    case_id: str
    kind: str
    source: Any

    def describe(self) -> Any:
        if isinstance(self.source, Mapping):
            return {k: str(v) for k, v in self.source.items()}
        if isinstance(self.source, (list, tuple)):
            return [str(v) for v in self.source]
        return str(self.source)


_BRATS_KEYS = {"t1", "t1n", "t1w", "t1ce", "t1c", "t1gd", "t2", "t2w", "flair", "t2f"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(name: str) -> str:
    out = _SAFE_ID.sub("_", name).strip("._")
    return out or "case"


def _read_manifest(path: Path) -> list[CaseSource]:
    """CSV with a header: optional ``case_id``; either ``folder`` (a BraTS case folder) or one column per channel.

    Channel columns named t1, t1ce, t2, flair (2023 names accepted; optional ``seg``) make a BraTS case; any other
    columns are image files in column order. Relative paths are relative to the CSV's folder.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot read manifest '{path}' ({type(e).__name__}: {e})") from e
    if not rows:
        raise PipelineError(f"manifest '{path}' has no rows (expected a header line and one line per case)")
    base = path.parent
    cases = []
    for i, row in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        cid = row.pop("case_id", "") or row.pop("case", "")
        row.pop("case", None)

        def p(v: str) -> Path:
            q = Path(v).expanduser()
            return q if q.is_absolute() else base / q

        if row.get("folder"):
            folder = p(row["folder"])
            cases.append(CaseSource(_safe_id(cid or folder.name), "brats_folder", folder))
            continue
        cols = {k: v for k, v in row.items() if v and k != "folder"}
        if not cols:
            raise PipelineError(f"manifest '{path}' line {i}: no 'folder' and no image columns")
        if set(cols) - {"seg", "label"} <= _BRATS_KEYS and len(set(cols) - {"seg", "label"}) == 4:
            mapping = {k: p(v) for k, v in cols.items()}
            from .data.loading import strip_image_suffix

            first = next(iter(mapping.values()))
            cases.append(CaseSource(_safe_id(cid or strip_image_suffix(first.name)), "brats_mapping", mapping))
        else:
            files = [p(v) for k, v in cols.items() if k not in ("seg", "label")]
            from .data.loading import strip_image_suffix

            cases.append(CaseSource(_safe_id(cid or strip_image_suffix(files[0].name)), "volumes", files))
    return cases


def discover_cases(inputs: Sequence[PathLike]) -> list[CaseSource]:
    """Turn the ``explain`` inputs into cases.

    * one folder that is a BraTS case (``<ID>_t1.nii.gz`` ... or ``<ID>-t1n.nii.gz`` ...) -> that case;
    * one folder whose sub-folders are BraTS cases -> a cohort (sorted by name; other sub-folders are ignored
      with a warning);
    * one ``.csv`` file -> a manifest (see :func:`_read_manifest`);
    * image files -> ONE case whose channels are the files in the order given.

    Raises:
        PipelineError: missing path, folder with no case, mixed kinds, duplicate case ids.
    """
    from .data.brats import discover_brats_case
    from .data.loading import MedcamDataError, strip_image_suffix

    paths = [Path(p) for p in inputs]
    if not paths:
        raise PipelineError("no input given: pass a BraTS case folder, a folder of cases, a CSV manifest or image files")
    for p in paths:
        if not p.exists():
            raise PipelineError(f"input '{p}' does not exist")
    cases: list[CaseSource]
    if len(paths) == 1 and paths[0].is_file() and paths[0].suffix.lower() == ".csv":
        cases = _read_manifest(paths[0])
    elif len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        try:
            _, cid, _ = discover_brats_case(folder)
            cases = [CaseSource(_safe_id(cid), "brats_folder", folder)]
        except MedcamDataError as first_error:
            subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
            cases = []
            for d in subs:
                try:
                    _, cid, _ = discover_brats_case(d)
                except MedcamDataError as e:
                    logger.warning("ignoring folder %s: %s", d, str(e).splitlines()[0])
                    continue
                cases.append(CaseSource(_safe_id(d.name if cid in ("", None) else cid), "brats_folder", d))
            if not cases:
                raise PipelineError(f"no BraTS case in '{folder}' nor in its sub-folders: {first_error}") from None
    else:
        if any(p.is_dir() for p in paths) and len(paths) > 1:
            raise PipelineError("give either one folder (a case or a folder of cases), one CSV manifest, or image files")
        if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
            raise PipelineError(f"manifest '{paths[0]}' is not a file")
        cases = [CaseSource(_safe_id(strip_image_suffix(paths[0].name)), "volumes", list(paths))]
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PipelineError(f"duplicate case ids {dup[:5]}: give each case a distinct case_id (manifest column)")
    return cases


def load_case(source: CaseSource | PathLike, model: LoadedModel) -> Any:
    """Load and preprocess one case with the model's settings (channel order, orientation, spacing, ...).

    Returns:
        :class:`~medcam.data.BratsCase` or :class:`~medcam.data.VolumeCase` (``image`` ``[C, X, Y, Z]``).
    """
    from .data import load_brats_case, load_volumes

    if not isinstance(source, CaseSource):
        found = discover_cases([source])
        if len(found) != 1:
            raise PipelineError(f"'{source}' holds {len(found)} cases; load them one at a time")
        source = found[0]
    pre = dict(model.preprocessing)
    if source.kind in ("brats_folder", "brats_mapping"):
        case = load_brats_case(source.source, channel_order=model.channel_order, case_id=source.case_id, **pre)
    else:
        case = load_volumes(list(source.source), case_id=source.case_id, **pre)
    if model.in_channels is not None and case.image.shape[0] != model.in_channels:
        raise PipelineError(
            f"case {source.case_id} has {case.image.shape[0]} channels but the model takes {model.in_channels}"
        )
    return case


# ====================================================================================================== explaining
def make_inferer(roi_size: Sequence[int] | None, *, overlap: float = 0.25, sw_batch_size: int = 1,
                 mode: str = "constant", progress: bool = False) -> Any:
    """A MONAI ``SlidingWindowInferer`` (or None for whole-image explanation when ``roi_size`` is None/empty)."""
    if not roi_size:
        return None
    from monai.inferers import SlidingWindowInferer

    if any(int(s) < 1 for s in roi_size):
        raise PipelineError(f"roi size must be positive integers, got {tuple(roi_size)}")
    if not 0 <= overlap < 1:
        raise PipelineError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("constant", "gaussian"):
        raise PipelineError(f"blend mode must be 'constant' or 'gaussian', got {mode!r}")
    return SlidingWindowInferer(tuple(int(s) for s in roi_size), sw_batch_size=int(sw_batch_size),
                                overlap=float(overlap), mode=mode, progress=progress)


def predict(net: nn.Module, image: torch.Tensor, inferer: Any, *, amp: bool = False) -> torch.Tensor:
    """Model output ``[B, C, *S]`` (float32 logits, detached): ``inferer(image, net)`` or ``net(image)``."""
    from .engine import BaseSegCAM

    helper = BaseSegCAM(net, layer="auto", amp=amp)  # reuse autocast and output selection
    with torch.no_grad(), helper.autocast(image.device):
        out = inferer(image, lambda x: helper.select_output(net(x))) if inferer is not None else net(image)
    out = helper.select_output(out)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return out.detach().float()


def _spacing(affine: Any) -> tuple[float, float, float]:
    a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, float)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def versions() -> dict[str, str]:
    """Versions of medcam and the libraries that shape its results."""
    import monai
    import nibabel

    return {"medcam": __version__, "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "nibabel": nibabel.__version__, "python": platform.python_version()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _overlay_channel(case: Any, region: str) -> int:
    names = [str(n).lower() for n in case.channel_names]
    want = _OVERLAY_CHANNEL.get(region.upper())
    return names.index(want) if want in names else 0


def _settings_signature(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]


def read_summary(case_dir: PathLike) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished case folder, or None if absent/unreadable/not medcam's."""
    p = Path(case_dir) / SUMMARY_NAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "medcam_version" in data else None


def _replace_dir(staging: Path, final: Path, overwrite: bool) -> None:
    """Move the finished staging folder onto ``final`` (replacing a previous medcam output only if allowed)."""
    if final.exists():
        if not overwrite:
            raise PipelineError(f"output folder '{final}' already exists; pass --overwrite to replace it")
        if read_summary(final) is None:
            raise PipelineError(f"'{final}' exists and is not a medcam output folder; refusing to replace it")
        old = final.parent / f".old-{uuid.uuid4().hex[:8]}-{final.name}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def explain_case(
    case: Any,
    model: LoadedModel | nn.Module,
    methods: Sequence[str],
    targets: Sequence[TargetSpec],
    layer: str | None = None,
    inferer: Any = None,
    out_dir: PathLike = "medcam-out",
    *,
    device: str | torch.device = "cpu",
    amp: bool = False,
    threshold: float | None = None,
    overwrite: bool = False,
    slicer: bool = True,
    png: bool = True,
    progress: bool = False,
    settings: Mapping[str, Any] | None = None,
    source: CaseSource | None = None,
) -> dict[str, Any]:
    """Explain one preprocessed case and write its folder ``out_dir`` (see the module docstring).

    Args:
        case: a loaded case (``case.image`` ``[C, X, Y, Z]`` MetaTensor, ``case.invert``, ``case.reference_path``).
        model: a :class:`LoadedModel` (or a bare ``nn.Module``: sigmoid outputs, unnamed channels).
        methods: names from :data:`medcam.METHODS` (``"hirescam"``, ``"gradcam"``, ...).
        targets: parsed target specs (:func:`parse_targets`).
        layer: dotted layer name, ``"auto"``, or None for the model's default.
        inferer: ``SlidingWindowInferer`` or None (whole image; spatial sizes must suit the network).
        out_dir: the case folder to create. Written in a hidden staging folder beside it and moved into place when
            complete, so a crash never leaves a half-written case.
        device, amp: where and how to run (amp: autocast, bf16 on CPU).
        threshold: probability threshold of predicted/component targets (None: 0.5 sigmoid / argmax softmax).
        overwrite: replace an existing case folder written by medcam.
        slicer, png: also write the Slicer folder / PNG overlays.
        progress: tqdm bars over sliding windows.
        settings: run settings recorded in the summary (and compared on resume).
        source: where the case came from (recorded in the summary).

    Returns:
        The summary dict (also written as ``out_dir/summary.json``). Per target: ``roi_voxels`` (preprocessed
        grid), ``roi_volume_ml``, ``score`` (explained score ``S = sum_ROI y`` in logit units, per method),
        ``map_max`` / ``map_sum`` (per method, preprocessed grid), relative paths of the written files.
    """
    from . import METHODS
    from .io import export_slicer_scene, save_heatmap, save_overlay_png

    t_start = time.perf_counter()
    if not isinstance(model, LoadedModel):
        model = LoadedModel(net=model, kind="module", spec=type(model).__name__)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    layer = layer or model.default_layer
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise PipelineError(f"output folder '{out_dir}' already exists; pass --overwrite to replace it")
    device = torch.device(device)
    net = model.net.to(device)
    timings: dict[str, Any] = {}

    t0 = time.perf_counter()
    tl = build_targets(targets, case, activation=model.activation, threshold=threshold)
    image = (case.image.as_tensor() if hasattr(case.image, "as_tensor") else torch.as_tensor(case.image))
    image = image[None].float().to(device)
    output = predict(net, image, inferer, amp=amp)
    timings["predict_s"] = round(time.perf_counter() - t0, 3)
    if output.shape[2:] != image.shape[2:]:
        raise ModelError(f"the model output {tuple(output.shape)} is not on the input grid {tuple(image.shape)}")
    n_out = output.shape[1]
    regions = list(model.regions) if len(model.regions) == n_out else [f"ch{i}" for i in range(n_out)]
    for s in targets:
        if s.channel >= n_out:
            raise TargetError(f"--target {s.text!r}: channel {s.channel} is out of range, the model has {n_out} outputs")

    results = {}
    timings["explain_s"] = {}
    for m in methods:
        t0 = time.perf_counter()
        cam = METHODS[m](net, layer=layer, inferer=inferer, amp=amp, output_activation=model.activation,
                         progress=progress)
        res = cam.explain(image, tl, output=output if inferer is not None else None)
        timings["explain_s"][m] = round(time.perf_counter() - t0, 3)
        results[m] = res

    # ---- write everything into a staging folder
    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".partial-{uuid.uuid4().hex[:8]}-{out_dir.name}"
    staging.mkdir()
    try:
        first = results[methods[0]]
        layer_name = first.layer
        sp = _spacing(case.image.affine)
        voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
        ref = Path(case.reference_path)
        target_rows = []
        roi_masks = [t.roi(output)[0].cpu().numpy() > 0 for t in tl]
        slicer_maps: dict[str, np.ndarray] = {}
        for k, (spec, t) in enumerate(zip(targets, tl)):
            target_rows.append({
                "name": spec.name, "spec": spec.text, "kind": spec.kind, "channel": spec.channel,
                "region": regions[spec.channel], "target": repr(t),
                "roi_voxels": int(first.roi_voxels[0, k]),
                "roi_volume_ml": round(int(first.roi_voxels[0, k]) * voxel_ml, 4),
                "score": {}, "map_max": {}, "map_sum": {}, "heatmaps": {}, "overlays": {},
            })
        for m, res in results.items():
            maps = res.maps[0].detach().float().cpu().numpy()  # [K, *S] preprocessed grid
            original = case.invert(maps)  # [K, *original]
            for k, (spec, row) in enumerate(zip(targets, target_rows)):
                row["score"][m] = float(res.scores[0, k])
                row["map_max"][m] = float(maps[k].max())
                row["map_sum"][m] = float(maps[k].sum())
                rel = f"heatmaps/{m.replace('+', 'pp')}_{spec.name}.nii.gz"
                save_heatmap(original[k], ref, staging / rel, method=METHOD_LABELS.get(m, m), target=spec.name,
                             layer=layer_name)
                row["heatmaps"][m] = rel
                slicer_maps[f"{m.replace('+', 'pp')} {spec.name}"] = original[k]
                if png:
                    rel_png = f"overlays/{m.replace('+', 'pp')}_{spec.name}.png"
                    ch = _overlay_channel(case, regions[spec.channel])
                    bg = case.image[ch].detach().cpu().numpy() if hasattr(case.image, "detach") else case.image[ch]
                    save_overlay_png(
                        bg, maps[k], roi_masks[k], staging / rel_png,
                        title=f"{case.case_id} | {METHOD_LABELS.get(m, m)} | target {spec.name} | layer {layer_name}"
                              f" | ROI contour, background {case.channel_names[ch]}",
                        spacing=sp,
                    )
                    row["overlays"][m] = rel_png
        # predicted regions (0/1 per output channel) on the original grid, for the summary and Slicer
        if model.activation == "sigmoid":
            pred = (torch.sigmoid(output[0]) > (0.5 if threshold is None else threshold)).float()
        else:
            pred = torch.nn.functional.one_hot(output[0].argmax(0), n_out).movedim(-1, 0).float()
        pred_np = pred.cpu().numpy()
        prediction = {regions[c]: int(pred_np[c].sum()) for c in range(n_out)}
        slicer_rel = None
        if slicer:
            pred_orig = case.invert(pred_np, nearest=True)
            export_slicer_scene(
                staging / "slicer", image_path=ref, heatmaps=slicer_maps, segmentation=pred_orig,
                segment_names=[f"predicted {r}" for r in regions], method="+".join(methods), layer=layer_name,
            )
            slicer_rel = "slicer/scene.mrml"
        timings["write_s"] = round(time.perf_counter() - t0, 3)
        timings["total_s"] = round(time.perf_counter() - t_start, 3)
        summary = {
            "medcam_version": __version__,
            "status": "ok",
            "case_id": case.case_id,
            "source": source.describe() if source is not None else {k: str(v) for k, v in case.paths.items()},
            "reference_image": str(ref),
            "channels": list(case.channel_names),
            "original_shape": list(case.original_shape),
            "preprocessed_shape": list(case.image.shape[1:]),
            "preprocessed_spacing_mm": [round(v, 4) for v in sp],
            "model": model.describe(),
            "layer": layer_name,
            "feature_shape": list(first.feature_shape),
            "methods": {m: METHOD_LABELS.get(m, m) for m in methods},
            "score_definition": "S = sum over ROI voxels of the target channel's logit (blended output with "
                                "sliding windows); maps: pre-ReLU on the layer grid -> trilinear upsampling -> ReLU, "
                                "not normalised",
            "sliding_window": None if inferer is None else {
                "roi_size": list(inferer.roi_size), "overlap": inferer.overlap, "mode": str(inferer.mode),
                "sw_batch_size": inferer.sw_batch_size, "windows": first.stats.get("windows"),
                "backward_windows": {m: r.stats.get("backward_windows") for m, r in results.items()},
            },
            "threshold": 0.5 if threshold is None and model.activation == "sigmoid" else threshold,
            "predicted_voxels": prediction,
            "targets": target_rows,
            "slicer_scene": slicer_rel,
            "device": str(device),
            "amp": bool(amp),
            "timings": timings,
            "versions": versions(),
            "settings": _jsonable(dict(settings or {})),
            "settings_signature": _settings_signature(settings or {}),
        }
        from .io import write_text_atomic

        write_text_atomic(staging / SUMMARY_NAME, json.dumps(_jsonable(summary), indent=2) + "\n")
        _replace_dir(staging, out_dir, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("case %s done in %.1f s -> %s", case.case_id, timings["total_s"], out_dir)
    return summary


def split_parts(cases: Sequence[CaseSource], num_parts: int = 1, part_id: int = 0) -> list[CaseSource]:
    """The cases of part ``part_id`` out of ``num_parts`` (cases sorted by id, then every ``num_parts``-th)."""
    if num_parts < 1:
        raise PipelineError(f"--num-parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise PipelineError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[part_id::num_parts]


def explain_cohort(
    cases: Sequence[CaseSource],
    model: LoadedModel,
    methods: Sequence[str],
    targets: Sequence[TargetSpec],
    layer: str | None = None,
    inferer: Any = None,
    out_dir: PathLike = "medcam-out",
    *,
    num_parts: int = 1,
    part_id: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    threshold: float | None = None,
    overwrite: bool = False,
    slicer: bool = True,
    png: bool = True,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Explain many cases into ``out_dir/<case_id>/``, resumably; failures are recorded, not fatal.

    * A case whose folder holds a ``summary.json`` written with the same settings is skipped (``"skipped"``);
      one written with other settings fails with a message (use ``overwrite=True`` or another ``out_dir``).
    * A case that raises is recorded as ``"failed"`` with ``"error"`` and the run goes on; nothing of it is left
      on disk, so the next run retries it.
    * ``num_parts``/``part_id`` pick this machine's share (:func:`split_parts`).

    Returns:
        The run summary (also written to ``out_dir/cohort_summary.json``, or
        ``cohort_summary.part<i>-of-<N>.json`` for a split run): ``cases`` [{case_id, status, error, seconds,
        summary}], counts ``ok``/``skipped``/``failed``.
    """
    from tqdm.auto import tqdm

    from .io import write_text_atomic

    out_dir = Path(out_dir)
    mine = split_parts(cases, num_parts, part_id)
    settings = dict(settings or {})
    signature = _settings_signature(settings)
    run_name = "cohort_summary.json" if num_parts == 1 else f"cohort_summary.part{part_id}-of-{num_parts}.json"
    run_path = out_dir / run_name
    if run_path.exists() and json_key(run_path, "medcam_version") is None:
        raise PipelineError(f"'{run_path}' exists and was not written by medcam; refusing to overwrite it")
    single = len(mine) == 1
    records = []
    bar = tqdm(mine, desc="medcam cases", unit="case", disable=not progress or single)
    for src in bar:
        bar.set_postfix_str(src.case_id)
        t0 = time.perf_counter()
        case_dir = out_dir / src.case_id
        rec: dict[str, Any] = {"case_id": src.case_id, "source": src.describe()}
        try:
            if case_dir.exists() and not overwrite:
                prev = read_summary(case_dir)
                if prev is None:
                    raise PipelineError(f"'{case_dir}' exists and holds no medcam summary.json; refusing to overwrite "
                                        "it (pass --overwrite, or move it away)")
                if prev.get("settings_signature") != signature:
                    raise PipelineError(f"'{case_dir}' was explained with other settings; pass --overwrite to redo it "
                                        "or choose another --output")
                rec.update(status="skipped", summary=f"{src.case_id}/{SUMMARY_NAME}")
                logger.info("case %s already done: skipped", src.case_id)
            else:
                case = load_case(src, model)
                explain_case(case, model, methods, targets, layer, inferer, case_dir, device=device, amp=amp,
                             threshold=threshold, overwrite=overwrite, slicer=slicer, png=png,
                             progress=progress and single, settings=settings, source=src)
                rec.update(status="ok", summary=f"{src.case_id}/{SUMMARY_NAME}")
        except Exception as e:  # noqa: BLE001 - one bad case must not stop a cohort
            msg = " ".join(str(e).split()) or type(e).__name__
            rec.update(status="failed", error=f"{type(e).__name__}: {msg}")
            logger.error("case %s failed: %s", src.case_id, msg)
            logger.debug("traceback of case %s", src.case_id, exc_info=True)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(rec)
        if on_case is not None:
            on_case(rec)
    bar.close()
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    run = {
        "medcam_version": __version__,
        "output": str(out_dir),
        "num_parts": num_parts,
        "part_id": part_id,
        "cases_total": len(cases),
        "cases_in_part": len(mine),
        **counts,
        "cases": records,
        "settings": _jsonable(settings),
        "settings_signature": signature,
        "versions": versions(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_path, json.dumps(_jsonable(run), indent=2) + "\n", overwrite=True)
    run["path"] = str(run_path)
    return run


def json_key(path: PathLike, key: str) -> Any:
    """``json.load(path)[key]`` or None if unreadable/absent."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None
