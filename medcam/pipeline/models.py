"""Model loading: the demo network, ``module:function`` factories with a checkpoint, MONAI bundles."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..errors import ModelError
from ..frameworks.base import Activation, Framework, read_monai_postprocessing
from ..types import PathLike
from .common import _jsonable
from .errors import PipelineError

logger = logging.getLogger(__package__)  # "medcam.pipeline", as before the split


@dataclass
class LoadedModel:
    """A network ready to explain, with what the pipeline needs to know about it.

    Attributes:
        net: the eager ``nn.Module`` (eval mode) mapping ``[B, Cin, *S]`` to ``[B, C, *S]`` logits.
        kind: the :class:`~medcam.frameworks.base.Framework` it comes from (a plain string is converted).
        spec: the ``--model`` string as given.
        checkpoint: weights file loaded, or None.
        regions: names of the C output channels (e.g. ``("TC", "WT", "ET")``), or ``()`` when unknown.
        activation: the model's output :class:`~medcam.frameworks.base.Activation` (a string is converted):
            sigmoid (multi-label), softmax (argmax labels), or none (the network applies its own; outputs are
            probabilities). A bundle's comes from its postprocessing.
        channel_order: BraTS modality order of the input channels (used when the input is a BraTS case).
        preprocessing: keyword arguments for ``load_brats_case`` / ``load_volumes`` (orientation, spacing mm, ...).
        default_layer: layer explained when none is given (``"auto"`` = the bottleneck).
        roi_size: default sliding-window size, or None for whole-image explanation.
        in_channels: number of input channels if known.
        sliding: the model's own sliding-window settings (``overlap``, ``sw_batch_size``, ``mode``), read from a
            bundle's ``inferer``; used unless the command line gives them.
    """

    net: nn.Module
    kind: Framework
    spec: str
    checkpoint: str | None = None
    regions: tuple[str, ...] = ()
    activation: Activation = Activation.SIGMOID
    channel_order: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
    preprocessing: dict[str, Any] = field(default_factory=dict)
    default_layer: str = "auto"
    roi_size: tuple[int, ...] | None = None
    in_channels: int | None = None
    sliding: dict[str, Any] = field(default_factory=dict)
    bundle_preprocessing: Any = None
    #: the bundle's postprocessing transforms that form its prediction (activation, ``Invertd``, ``AsDiscreted``)
    bundle_postprocessing: Any = None
    pipeline: dict[str, Any] = field(default_factory=lambda: {"preprocessing": "medcam", "inverse": "medcam"})
    #: the adapter of a framework that brings its own (nnU-Net); None: the MONAI adapter of this model
    framework_adapter: Any = None

    def __post_init__(self) -> None:
        self.kind = Framework(self.kind)
        self.activation = Activation.of(self.activation)

    @property
    def adapter(self) -> Any:
        """This model's :class:`~medcam.frameworks.base.FrameworkAdapter`."""
        if self.framework_adapter is not None:
            return self.framework_adapter
        from .adapters import adapter_of

        return adapter_of(self)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description for ``summary.json``."""
        if self.framework_adapter is not None:
            return {"kind": self.kind.value, "spec": self.spec, **dict(self.framework_adapter.describe())}
        return {
            "kind": self.kind.value,
            "spec": self.spec,
            "checkpoint": self.checkpoint,
            "class": type(self.net).__name__,
            "parameters": int(sum(p.numel() for p in self.net.parameters())),
            "regions": list(self.regions),
            "activation": self.activation.value,
            "channel_order": list(self.channel_order),
            "preprocessing": _jsonable(self.preprocessing),
            "pipeline": dict(self.pipeline),
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
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        own = set(net.state_dict())
        missing = sorted(own - set(state))[:3]
        unexpected = sorted(set(state) - own)[:3]
        detail = (
            f"missing keys {missing}, unexpected keys {unexpected}"
            if missing or unexpected
            else (str(e).strip().splitlines()[-1].strip()[:200])
        )
        raise ModelError(f"weights in '{source}' do not fit the network {type(net).__name__}: {detail}") from e


def _import_factory(spec: str) -> Callable[[], Any]:
    """``pkg.module:function`` or ``path/to/file.py:function`` -> the callable."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name or not fn_name.isidentifier():
        raise PipelineError(
            f"--model {spec!r}: expected 'demo', 'package.module:function', 'file.py:function' or a MONAI bundle folder"
        )
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise PipelineError(f"--model {spec!r}: file '{path}' does not exist")
            mspec = importlib.util.spec_from_file_location(f"medcam_factory_{path.stem}", path)
            if mspec is None or mspec.loader is None:
                raise PipelineError(f"--model {spec!r}: '{path}' cannot be imported as a Python module")
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            cwd = str(Path.cwd())
            added = cwd not in sys.path  # the working folder on the path for this import only
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(mod_name)
            finally:
                if added and cwd in sys.path:
                    sys.path.remove(cwd)
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


def _bundle_inferer(parser: Any, cfg: Path) -> tuple[tuple[int, ...] | None, dict[str, Any]]:
    """The bundle's own ``inferer`` if it is a ``SlidingWindowInferer``: ``(roi_size, {overlap, sw_batch_size, mode})``.

    Explaining with the settings the bundle is run with means explaining the output its users see.
    """
    if "inferer" not in parser.get():
        return None, {}
    from monai.inferers import SlidingWindowInferer

    try:
        inferer = parser.get_parsed_content("inferer", instantiate=True)
    except Exception as e:  # noqa: BLE001 - an inferer needing other parts of the config: fall back to defaults
        logger.warning(
            "bundle '%s': its inferer could not be built (%s: %s); using medcam's sliding-window defaults",
            cfg,
            type(e).__name__,
            str(e).splitlines()[0][:200] if str(e) else "",
        )
        return None, {}
    if not isinstance(inferer, SlidingWindowInferer):
        logger.info(
            "bundle '%s': inferer %s is not a SlidingWindowInferer; whole-image explanation by default",
            cfg,
            type(inferer).__name__,
        )
        return None, {}
    mode = getattr(inferer.mode, "value", inferer.mode)
    overlap = inferer.overlap if isinstance(inferer.overlap, (int, float)) else inferer.overlap[0]
    if not isinstance(inferer.overlap, (int, float)) and len(set(inferer.overlap)) > 1:
        logger.warning("bundle '%s': per-axis overlap %s; medcam uses %s", cfg, inferer.overlap, overlap)
    # an int roi_size is the same on every axis (MONAI's convention; bundles explained here are 3D)
    sizes = [inferer.roi_size] * 3 if isinstance(inferer.roi_size, int) else list(inferer.roi_size)
    roi = tuple(int(r) for r in sizes) if all(int(r) > 0 for r in sizes) else None
    return roi, {"overlap": float(overlap), "sw_batch_size": int(inferer.sw_batch_size), "mode": str(mode)}


def _load_bundle(folder: Path) -> tuple[nn.Module, str, tuple[int, ...] | None, dict[str, Any], dict[str, Any]]:
    """Instantiate ``network_def`` of ``configs/inference.json`` and load ``models/model.pt`` (no download).

    Returns ``(network, weights path, the inferer's roi_size or None, its other sliding-window settings, the
    bundle's own pipeline (see :func:`_bundle_pipeline`))``.
    """
    cfg = next(
        (
            folder / "configs" / n
            for n in ("inference.json", "inference.yaml", "inference.yml")
            if (folder / "configs" / n).is_file()
        ),
        None,
    )
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
    roi, sliding = _bundle_inferer(parser, cfg)
    return net, str(weights), roi, sliding, _bundle_pipeline(parser, cfg)


def _bundle_pipeline(parser: Any, cfg: Path) -> dict[str, Any]:
    """The bundle's own ``preprocessing`` (instantiated) and what its ``postprocessing`` says, when they exist.

    Returns ``{"preprocessing": Compose or None, "activation": "sigmoid"/"softmax"/None, "invertd": bool,
    "reason": why the bundle's preprocessing is not used (or "")}``. The preprocessing is used only if it is a
    ``Compose`` of dictionary transforms starting with ``LoadImaged`` on ``image`` (what ``monai.bundle run`` feeds
    its dataset with), so that medcam can give it the case's files and invert it with MONAI's ``Invertd``.
    """
    from monai.transforms import Compose, LoadImaged

    content = parser.get()
    out: dict[str, Any] = {"preprocessing": None, "activation": None, "invertd": False, "reason": ""}
    if "preprocessing" not in content:
        out["reason"] = "the bundle's inference config has no 'preprocessing'"
        return out
    try:
        pre = parser.get_parsed_content("preprocessing", instantiate=True)
    except Exception as e:  # noqa: BLE001 - a preprocessing needing other parts of the config: fall back
        out["reason"] = f"its preprocessing could not be built ({type(e).__name__}: {str(e).splitlines()[0][:150]})"
        logger.warning("bundle '%s': %s; using medcam's preprocessing", cfg, out["reason"])
        return out
    first = pre.transforms[0] if isinstance(pre, Compose) and pre.transforms else None
    if not isinstance(first, LoadImaged) or "image" not in first.keys:
        out["reason"] = "its preprocessing does not start with LoadImaged(keys='image')"
        logger.warning("bundle '%s': %s; using medcam's preprocessing", cfg, out["reason"])
        return out
    out["preprocessing"] = pre
    transforms = _postprocessing_transforms(parser, cfg)
    post = read_monai_postprocessing(transforms)
    out["activation"], out["invertd"], out["postprocessing"] = post.activation, post.invertd, post
    out["post_transforms"] = transforms
    return out


_READ_POSTPROCESSING = ("Activations", "Activationsd", "AsDiscrete", "AsDiscreted", "Invertd")


def _postprocessing_transforms(parser: Any, cfg: Path) -> list[Any]:
    """The transforms of the bundle's ``postprocessing`` that say how its prediction is formed (activation,
    discretisation, ``Invertd``), each instantiated on its own: the others (``SaveImaged``, ``Lambdad`` ...) are
    neither built nor run."""
    raw = parser.get().get("postprocessing")
    items = raw.get("transforms", []) if isinstance(raw, Mapping) else []
    out = []
    for i, item in enumerate(items):
        target = str(item.get("_target_", "")) if isinstance(item, Mapping) else ""
        if target.rsplit(".", 1)[-1] not in _READ_POSTPROCESSING:
            continue
        try:
            out.append(parser.get_parsed_content(f"postprocessing#transforms#{i}", instantiate=True))
        except Exception as e:  # noqa: BLE001 - a transform needing other parts of the config: skip it
            logger.warning("bundle '%s': postprocessing transform %s not read (%s)", cfg, target, e)
    return out


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
    folds: Sequence[int | str] = (0,),
    checkpoint_name: str = "checkpoint_final.pth",
    use_mirroring: bool = True,
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
        activation: ``"sigmoid"`` or ``"softmax"`` (default sigmoid); ``"none"`` when the network ends in its own
            sigmoid/softmax (its outputs are probabilities, thresholded as they are).
        channel_order: BraTS modality order of the input channels (default T1, T1ce, T2, FLAIR; MONAI's
            brats_mri_segmentation bundle needs ``("t1ce", "t1", "t2", "flair")``).
        preprocessing: overrides of the ``load_brats_case``/``load_volumes`` keyword arguments.
        roi_size: sliding-window size (default: the demo's :data:`~medcam.models.demo.DEMO_ROI_SIZE`, a bundle's
            ``SlidingWindowInferer`` roi_size; else whole image).
        layer: default layer (demo default :data:`~medcam.models.demo.DEMO_LAYER`; else ``"auto"``).
        weights: False builds the demo architecture without loading weights (for ``medcam layers``).
        folds, checkpoint_name, use_mirroring: for ``"nnunet:FOLDER"`` (a trained nnU-Net v2 model folder, run by its adapter
            :class:`~medcam.frameworks.nnunet.NnUNetModel`): the folds to average, the checkpoint
            file of each ``fold_N`` and the predictor's test-time mirroring. Its plans define preprocessing, windows and outputs: the options above that
            set them are refused.

    Returns:
        :class:`LoadedModel` with the network in eval mode on ``device``.

    Raises:
        PipelineError / ModelError: with a one-line reason (missing file, TorchScript, bad factory, key mismatch).
    """
    if activation is not None and activation not in ("sigmoid", "softmax", "none"):
        raise PipelineError(
            f"activation must be 'sigmoid', 'softmax' or 'none' (the model outputs probabilities), got {activation!r}"
        )
    if str(spec).startswith("nnunet:"):
        given = {"checkpoint": checkpoint, **dict(preprocessing or {}), "regions": regions,
                 "activation": activation, "channel_order": channel_order, "roi_size": roi_size}  # fmt: skip
        return _load_nnunet(str(spec), (folds, checkpoint_name, use_mirroring), str(device), layer, given)
    loaded = _load_by_kind(str(spec), checkpoint, weights, preprocessing)
    _apply_overrides(
        loaded, preprocessing=preprocessing, regions=regions, activation=activation, channel_order=channel_order,
        roi_size=roi_size, layer=layer,
    )  # fmt: skip
    if loaded.in_channels is None:
        loaded.in_channels = _first_conv_channels(loaded.net)
    loaded.net = loaded.net.to(device).eval()
    return loaded


def _load_nnunet(
    spec: str,
    checkpoints: tuple[Sequence[int | str], str, bool],
    device: str,
    layer: str | None,
    given: Mapping[str, Any],
) -> LoadedModel:
    """``nnunet:FOLDER`` through its adapter; ``checkpoints``: (folds, checkpoint name, test-time mirroring); the
    options its plans define are refused, naming them."""
    from ..frameworks import nnunet

    folds, checkpoint_name, mirroring = checkpoints
    refused = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if refused:
        raise PipelineError(
            f"{', '.join(refused)} do not apply to nnU-Net models: the model folder's plans and dataset.json define "
            "them (use --folds and --checkpoint-name to pick the checkpoints)"
        )
    folder = spec[len("nnunet:") :]
    adapter = nnunet.load(folder, list(folds), checkpoint_name, device=device, use_mirroring=mirroring)
    net = adapter.network
    return LoadedModel(
        net=net, kind=Framework.NNUNET, spec=spec, checkpoint=checkpoint_name, regions=adapter.output_names,
        activation=adapter.activation, channel_order=tuple(adapter.channel_names), preprocessing={},
        default_layer=layer or "auto", in_channels=len(adapter.channel_names),
        pipeline={"preprocessing": "nnunet", "inverse": "nnunet export"}, framework_adapter=adapter,
    )  # fmt: skip


#: ``load_brats_case`` / ``load_volumes`` keywords of every model, before its own defaults and the user's overrides
_DEFAULT_PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS",
    "spacing": None,
    "normalize": True,
    "crop_foreground": False,
    "divisible_by": None,
}


def _load_by_kind(
    spec: str, checkpoint: PathLike | None, weights: bool, preprocessing: Mapping[str, Any] | None
) -> LoadedModel:
    """Dispatch ``--model`` to the loader of its kind: demo, bundle folder, factory (a model file is refused)."""
    if spec == "demo":
        loaded = _load_demo(checkpoint, weights)
    elif Path(spec).is_dir():
        loaded = _load_bundle_model(spec, checkpoint, use_own_preprocessing=not preprocessing)
    elif Path(spec).is_file():
        _refuse_model_file(spec)
    elif ":" in spec:
        loaded = _load_factory(spec, checkpoint)
    else:
        raise PipelineError(
            f"--model {spec!r} not found: expected 'demo', 'package.module:function', 'file.py:function' or a MONAI "
            "bundle folder (configs/inference.json + models/model.pt)"
        )
    loaded.preprocessing = {**_DEFAULT_PREPROCESSING, **loaded.preprocessing}
    return loaded


def _load_demo(checkpoint: PathLike | None, weights: bool) -> LoadedModel:
    """The shipped SegResNet (its weights, ``checkpoint``'s, or none) with its regions, layer and preprocessing."""
    from ..models import demo

    ckpt: str | None
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
    return LoadedModel(
        net=net,
        kind=Framework.DEMO,
        spec="demo",
        checkpoint=ckpt,
        regions=tuple(demo.DEMO_REGIONS),
        activation=Activation.SIGMOID,
        channel_order=tuple(demo.DEMO_CHANNELS),
        preprocessing=dict(demo.demo_preprocessing_kwargs()),  # the one definition, shared with the Python recipe
        default_layer=demo.DEMO_LAYER,
        roi_size=tuple(demo.DEMO_ROI_SIZE),
        in_channels=len(demo.DEMO_CHANNELS),
    )


def _load_bundle_model(spec: str, checkpoint: PathLike | None, use_own_preprocessing: bool) -> LoadedModel:
    """A MONAI bundle folder, with its own preprocessing and activation when they can be used (no preprocessing
    options given) - else medcam's pipeline, the reason recorded in ``pipeline``."""
    if checkpoint is not None:
        raise PipelineError("--checkpoint is for factory models; a bundle's weights are its models/model.pt")
    net, ckpt, bundle_roi, sliding, own = _load_bundle(Path(spec))
    loaded = LoadedModel(
        net=net, kind=Framework.BUNDLE, spec=spec, checkpoint=ckpt, roi_size=bundle_roi, sliding=sliding
    )
    if own["preprocessing"] is not None and use_own_preprocessing:
        loaded.bundle_preprocessing = own["preprocessing"]
        loaded.bundle_postprocessing = own.get("post_transforms") or None
        loaded.pipeline = {
            "preprocessing": "bundle",
            "inverse": "bundle Invertd" if own["invertd"] else "MONAI Invertd of the bundle's preprocessing",
        }
        if own["activation"] is not None:
            loaded.activation = Activation.of(own["activation"])
    elif own["preprocessing"] is not None:
        loaded.pipeline = {"preprocessing": "medcam", "inverse": "medcam", "reason": "preprocessing options given"}
    else:
        loaded.pipeline = {"preprocessing": "medcam", "inverse": "medcam", "reason": own["reason"]}
    return loaded


def _refuse_model_file(spec: str) -> NoReturn:
    """A single file is not a model spec: say what to give instead (TorchScript archives get their own hint)."""
    if _is_torchscript_archive(Path(spec)):
        raise ModelError(f"--model '{spec}' {_TORCHSCRIPT_HINT}")
    raise PipelineError(
        f"--model '{spec}' is a file; give the network as 'package.module:function' (or 'file.py:function') and "
        "the weights with --checkpoint, or a MONAI bundle folder"
    )


def _load_factory(spec: str, checkpoint: PathLike | None) -> LoadedModel:
    """``module:function`` / ``file.py:function`` called without arguments, then ``checkpoint``'s weights."""
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
    return LoadedModel(net=net, kind=Framework.FACTORY, spec=spec, checkpoint=ckpt)


def _apply_overrides(
    loaded: LoadedModel,
    *,
    preprocessing: Mapping[str, Any] | None,
    regions: Sequence[str] | None,
    activation: str | None,
    channel_order: Sequence[str] | None,
    roi_size: Sequence[int] | None,
    layer: str | None,
) -> None:
    """The caller's settings over the model's own defaults (unknown preprocessing keys refused)."""
    if preprocessing:
        unknown = set(preprocessing) - set(loaded.preprocessing)
        if unknown:
            raise PipelineError(f"unknown preprocessing options {sorted(unknown)}; use {sorted(loaded.preprocessing)}")
        loaded.preprocessing.update({k: v for k, v in preprocessing.items()})
    if regions is not None:
        loaded.regions = tuple(str(r) for r in regions)
    if activation is not None:
        loaded.activation = Activation.of(activation)
    if channel_order is not None:
        loaded.channel_order = tuple(str(c).lower() for c in channel_order)
    if roi_size is not None:
        loaded.roi_size = tuple(int(s) for s in roi_size) or None
    if layer is not None:
        loaded.default_layer = layer
