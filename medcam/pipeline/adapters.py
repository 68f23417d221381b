"""The MONAI adapters of the case pipeline (:mod:`medcam.frameworks.base`): demo/factory networks with medcam's own
preprocessing (:class:`MonaiAdapter`) and MONAI bundles with theirs (:class:`BundleAdapter`).

Both give the pass plan of the whole image, or of MONAI's sliding window with the model's inferer settings;
they differ in how a case reaches the model's grid and back: medcam's ``load_brats_case``/``load_volumes`` and their
inverse, or the bundle's own ``preprocessing`` Compose and MONAI ``Invertd`` on it (what the bundle's postprocessing
does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..frameworks.base import Activation, Framework, segmentation_dtype
from ..hooks import is_size_mismatch
from ..plan import PassPlan
from ..runner import ModelRunner, validate_image
from ..types import PathLike
from .cases import CaseLayout, CaseSource, discover_cases, discover_channel_cases
from .errors import PipelineError

__all__ = [
    "MonaiAdapter", "BundleAdapter", "adapter_of", "predict", "model_failure", "predicted_regions",
    "check_on_case_grid",
]  # fmt: skip


def adapter_of(model: Any) -> Any:
    """The adapter of a loaded MONAI model (a :class:`~medcam.pipeline.LoadedModel`): :class:`BundleAdapter` when it runs a bundle's own preprocessing,
    else :class:`MonaiAdapter`."""
    return BundleAdapter(model) if model.bundle_preprocessing is not None else MonaiAdapter(model)


def predict(net: nn.Module, image: torch.Tensor, inferer: Any, *, amp: bool = False) -> torch.Tensor:
    """Model output ``[B, C, *S]`` (float32, detached): ``inferer(image, net)`` or ``net(image)``, output selected
    and model state preserved as in an explanation (:meth:`medcam.ModelRunner.predict`).

    Raises:
        ModelError: the network failed on the case, with the command-line fix for a volume-size mismatch.
    """
    try:
        return ModelRunner(net, amp=amp).predict(image, inferer)
    except ModelError as e:
        cause = e.__cause__
        if cause is None or not is_size_mismatch(cause):
            raise
        raise model_failure(cause, tuple(image.shape), inferer is not None) from e
    except RuntimeError as e:  # raised outside the model (e.g. by the sliding-window inferer)
        raise model_failure(e, tuple(image.shape), inferer is not None) from e


def model_failure(error: BaseException, shape: tuple[int, ...], sliding: bool) -> ModelError:
    """The network failed on a preprocessed case: say so, with the command-line fix for a volume-size mismatch."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = f"the model failed on the preprocessed case of shape {shape} ({type(error).__name__}: {first[:300]})"
    if is_size_mismatch(error):
        where = "each window (--roi-size)" if sliding else "the volume"
        text += (
            f"; the network needs spatial sizes divisible by its total downsampling factor: pad {where} with "
            "--divisible-by 16 (2^levels of the encoder; 8 or 32 for other depths)"
            + (", and choose an --roi-size divisible by it" if sliding else ", or use --roi-size")
        )
    return ModelError(text)


def _as_tensor(image: Any) -> torch.Tensor:
    return image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)


@dataclass
class MonaiAdapter:
    """A PyTorch/MONAI network (demo, ``module:function`` factory, bare module) with medcam's preprocessing."""

    #: the :class:`~medcam.pipeline.LoadedModel` (not imported here: the model module creates its adapters)
    model: Any
    #: medcam's executors on :attr:`network`: a randomised copy of it can be explained (the sanity check)
    own_executor = False

    @property
    def framework(self) -> Framework:
        return self.model.kind

    @property
    def network(self) -> nn.Module:
        return self.model.net

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.model.regions)

    @property
    def activation(self) -> Activation:
        return Activation.of(self.model.activation)

    def setup(self, device: str) -> MonaiAdapter:
        self.model.net.to(device)
        return self

    def discover(self, inputs: Sequence[PathLike], case_id: str | None = None) -> list[CaseSource]:
        """:func:`~medcam.pipeline.cases.discover_cases`; with the channel-indexed layout (nnU-Net's
        ``CASE_XXXX.nii.gz``) and the channel count checked when the network's input channels are known."""
        if self.model.in_channels is None:
            return discover_cases(list(inputs), case_id=case_id)
        return discover_channel_cases(list(inputs), self.model.in_channels, (".nii.gz", ".nii"), case_id)

    def load_case(self, source: CaseSource) -> Any:
        """medcam's preprocessing (``load_brats_case`` for BraTS cases in ``channel_order``, else
        ``load_volumes``) with the model's settings."""
        from ..data import load_brats_case, load_volumes

        pre = dict(self.model.preprocessing)
        files = dict(source.require_files())
        if source.kind is CaseLayout.VOLUMES:
            case = load_volumes(source.channel_files(), case_id=source.case_id, **pre)
        else:
            case = load_brats_case(files, channel_order=self.model.channel_order, case_id=source.case_id, **pre)
        self._check_channels(source, case)
        return case

    def _check_channels(self, source: CaseSource, case: Any) -> None:
        if self.model.in_channels is not None and case.image.shape[0] != self.model.in_channels:
            raise PipelineError(
                f"case {source.case_id} has {case.image.shape[0]} channels but the model takes {self.model.in_channels}"
            )

    def targets(self, specs: Sequence[Any], case: Any, source: Any, threshold: float | None) -> list[Any]:
        from .target_specs import build_targets

        return build_targets(specs, case, activation=self.activation.value, threshold=threshold)

    def predict(
        self, case: Any, targets: Sequence[Any], *, inferer: Any, device: torch.device, amp: bool
    ) -> torch.Tensor | None:
        """None when the first explanation forms the prediction in its own pass (the whole image's one forward
        pass; sliding windows when a target needs it: one pass with kept graphs); else MONAI's inference."""
        if inferer is None or any(getattr(t, "needs_prediction", True) for t in targets):
            return None
        image = _as_tensor(case.image)[None].float().to(device)
        return predict(self.model.net.to(device), image, inferer, amp=amp)

    def predict_image(self, case: Any, image: torch.Tensor, *, inferer: Any, device: torch.device) -> torch.Tensor:
        """The network on ``image`` ``[N, Cin, *S]`` (on the case's grid), through ``inferer`` (the model's window
        settings) when given, as :meth:`predict` runs the case: logits ``[N, C, *S]`` on ``image.device``."""
        check_on_case_grid(case, image)
        return predict(self.model.net, image.to(device), inferer).to(image.device)

    def reference_regions(self, case: Any, source: Any) -> torch.Tensor | None:
        """The case's label as loaded on the model's grid by medcam's preprocessing (nearest-neighbour), ``> 0``:
        ``[3, *S]`` (TC, WT, ET); None when the case has none (a bundle's cases: its preprocessing reads images)."""
        label = getattr(case, "label", None)
        if label is None:
            return None
        return torch.as_tensor(label.as_tensor() if hasattr(label, "as_tensor") else label) > 0

    def plan(self, case: Any, *, inferer: Any, device: torch.device) -> PassPlan:
        """The whole image (``inferer`` None: one pass) or MONAI's sliding window of ``inferer``
        (:func:`medcam.sliding.monai_plan`), on ``device``."""
        from ..engine import check_spatial_dims
        from ..plan import whole_plan
        from ..sliding import monai_plan

        self.model.net.to(device)
        image = validate_image(_as_tensor(case.image)[None].float().to(device))
        check_spatial_dims(image, inferer)
        return whole_plan(image) if inferer is None else monai_plan(inferer, image)

    def segmentation(self, case: Any, output: torch.Tensor, threshold: float | None) -> np.ndarray:
        """Softmax: argmax labels ``[*original]`` (uint8); sigmoid/none: region masks ``[C, *original]`` (uint8),
        mapped back with nearest-neighbour interpolation."""
        out = output[0].detach().float().cpu()
        if self.activation is Activation.SOFTMAX:
            labels = out.argmax(0).float()
            back = case.invert(labels, nearest=True)
            return np.rint(back).astype(segmentation_dtype(out.shape[0]))
        return (case.invert(predicted_regions(output, self.activation, threshold), nearest=True) > 0.5).astype(np.uint8)

    def describe(self) -> Mapping[str, Any]:
        return self.model.describe()


def check_on_case_grid(case: Any, image: torch.Tensor) -> None:
    """``image`` is ``[N, Cin, *S]`` with the channels and grid of ``case.image`` ``[Cin, *S]`` (ValueError)."""
    if image.ndim != case.image.ndim + 1 or tuple(image.shape[1:]) != tuple(case.image.shape):
        raise ValueError(
            f"images {tuple(image.shape)} are not on case {case.case_id}'s grid: expected [N, "
            f"{', '.join(str(int(v)) for v in case.image.shape)}]"
        )


def predicted_regions(output: torch.Tensor, activation: Activation, threshold: float | None) -> np.ndarray:
    """0/1 prediction per output channel ``[C, *S]`` of ``output [1, C, *S]``: sigmoid > threshold, outputs >
    threshold for ``none``, one-hot argmax for softmax (threshold None: 0.5)."""
    out = output[0].detach().float()
    thr = 0.5 if threshold is None else threshold
    if activation is Activation.SIGMOID:
        pred = (torch.sigmoid(out) > thr).float()
    elif activation is Activation.NONE:
        pred = (out > thr).float()
    else:
        pred = torch.nn.functional.one_hot(out.argmax(0), out.shape[0]).movedim(-1, 0).float()
    return pred.cpu().numpy()


class BundleAdapter(MonaiAdapter):
    """A MONAI bundle run as the bundle runs it: its ``preprocessing`` on ``{"image": files}``, its inferer's
    settings, its postprocessing's activation, and ``Invertd`` on its preprocessing back to the original grid."""

    def load_case(self, source: CaseSource) -> Any:
        """The bundle's own preprocessing. BraTS cases give their files in ``channel_order``; image files are taken
        in the order given. The case's ``paths`` are keyed by its channel names (like medcam's own cases)."""
        from ..data import VolumeCase
        from ..data.loading import read_header

        found = dict(source.require_files())
        files = source.files_in_order(self.model.channel_order)
        if source.kind is CaseLayout.VOLUMES:
            names = tuple(f"channel{i}" for i in range(len(files)))
        else:
            names = tuple(self.model.channel_order)
        header = read_header(files[0])
        for f in files[1:]:
            read_header(f)  # missing/unreadable files fail here, before the bundle's loader
        pre = self.model.bundle_preprocessing
        try:
            out = pre({"image": [str(f) for f in files] if len(files) > 1 else str(files[0])})
        except Exception as e:  # noqa: BLE001 - MONAI wraps transform errors in RuntimeError
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise PipelineError(
                f"case {source.case_id}: the bundle's own preprocessing failed ({type(e).__name__}: {first[:200]})"
            ) from e
        paths = dict(zip(names, files))
        if "seg" in found:
            paths["seg"] = Path(found["seg"])
        case = VolumeCase(
            image=out["image"], label=None, paths=paths, reference_path=files[0], case_id=source.case_id,
            channel_names=names, transform=pre, original_affine=header.affine,
            original_shape=(int(header.shape[0]), int(header.shape[1]), int(header.shape[2])),
        )  # fmt: skip
        self._check_channels(source, case)
        return case

    def segmentation(self, case: Any, output: torch.Tensor, threshold: float | None) -> np.ndarray:
        """The bundle's own postprocessing on the output (its activation, ``Invertd`` and ``AsDiscreted``, in its
        order; ``SaveImaged`` and other transforms are not run): argmax labels ``[*original]`` (uint8) or region
        masks ``[C, *original]`` (uint8). Without ``Invertd`` + ``AsDiscreted`` in it, as :class:`MonaiAdapter`.
        ``threshold`` (the command line's) replaces the bundle's ``AsDiscreted`` threshold when given."""
        from monai.data import MetaTensor
        from monai.transforms import AsDiscreted, Compose

        post = list(self.model.bundle_postprocessing or [])
        names = {type(t).__name__ for t in post}
        if not {"Invertd", "AsDiscreted"} <= names or (threshold is not None and self.activation is Activation.SOFTMAX):
            return super().segmentation(case, output, threshold)
        if threshold is not None:
            post = [AsDiscreted(keys=t.keys, threshold=threshold) if isinstance(t, AsDiscreted) else t for t in post]
        pred = MetaTensor(output[0].detach().float().cpu(), affine=case.image.affine.clone())
        out = Compose(post)({"image": case.image, "pred": pred})["pred"]
        arr = np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out)
        if arr.shape[0] == 1:  # argmax: one label channel
            return np.rint(arr[0]).astype(segmentation_dtype(output.shape[1]))
        return (arr > 0.5).astype(np.uint8)
