"""MONAI sliding-window executor: explain a whole volume window by window, with MONAI's sliding-window semantics.

Definition (what is explained). MONAI's ``sliding_window_inference`` blends window outputs ``y_w`` with the
importance map ``omega`` (constant or gaussian) of each window:

    Y(u) = sum_w omega_w(u) y_w(u) / sum_w omega_w(u)

and the ROI score is ``S = sum_u W(u) Y(u)`` (``W`` = score weights of the target on the blended output). Hence

    dS/dy_w(u) = W(u) omega_w(u) / sum_w' omega_w'(u)            (1)

and each window is differentiated on its own with (1) as its output gradient: no graph spans two windows, so
memory is that of ``sw_batch_size`` windows whatever the volume size.

* Element-wise formulas (:class:`~medcam.formulas.ElementwiseFormula`: HiResCAM, LayerCAM): each window's pre-ReLU
  map is formed from its gradient (which already carries the blending weight), upsampled to the window size and
  summed into volume coordinates.
* Pooled formulas (:class:`~medcam.formulas.PooledFormula`: Grad-CAM, XGrad-CAM, Grad-CAM++): channel weights are
  global. Their statistics (e.g. ``sum_u g_k``) are summed over all windows; ``N`` = feature-grid positions covering
  the whole volume; activation sums (XGrad-CAM's denominator, Grad-CAM++'s ``sum_v A_k``) weight each window's
  feature positions by its normalised blending weight, area-averaged onto the feature grid, so that overlaps count
  once. The per-window maps ``sum_k alpha_k A_wk`` are then upsampled and blended with the same normalised
  importance weights as the output. This needs the activations of every window, taken in forward-only passes that
  stop at the hooked layer.
* ReLU is applied once, on the stitched map.

With one window covering the volume both reduce exactly to the whole-volume result.

Passes (one function each, sharing one :class:`SlidingState`): (0) :func:`reference_pass`: one no-grad
``sliding_window_inference`` when a target needs the prediction (PredictedROI, ComponentROI) or the score is on
probabilities; (A) :func:`activation_statistics_pass`: :class:`~medcam.formulas.ActivationPooledFormula` only
(XGrad-CAM, Grad-CAM++): forward up to the hooked layer for every window, summing the blended activation statistics
of the volume; (1) :func:`gradient_pass`: forward + backward of every window whose slice of the output gradient is
non-zero for some target; windows outside all ROIs get no forward or backward at all; (2) :func:`map_pass`: pooled
formulas only: forward up to the hooked layer for every window, blending the maps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.utils import BlendMode, PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option
from tqdm import tqdm

from .errors import MedcamError
from .formulas import ActivationPooledFormula, ElementwiseFormula, Formula, PooledFormula, Statistics
from .formulas import weighted_channel_sum as _weighted_channel_sum
from .hooks import ActivationHook
from .result import CAMResult, Upsampler, interpolate_upsampler
from .runner import ModelRunner
from .targets import Target, span

__all__ = [
    "explain_sliding",
    "check_inferer",
    "stitch_device",
    "window_example",
    "WindowGrid",
    "ChannelSparse",
    "SlidingState",
    "open_state",
    "reference_pass",
    "blend_pooled_maps",
]

logger = logging.getLogger(__name__)

#: one window of one sample: ``(sample index b, window index i)``
WindowRef = tuple[int, int]


def check_inferer(inferer: Any) -> SlidingWindowInferer:
    """Refuse inferers medcam cannot follow exactly, with the reason."""
    if not isinstance(inferer, SlidingWindowInferer):
        raise MedcamError(
            f"inferer must be a monai.inferers.SlidingWindowInferer, got {type(inferer).__name__}; "
            "for whole-image explanation pass inferer=None"
        )
    if getattr(inferer, "with_coord", False):
        raise MedcamError("SlidingWindowInferer(with_coord=True) is not supported: the predictor must take one tensor")
    return inferer


def window_example(inferer: Any, image: torch.Tensor) -> torch.Tensor:
    """A zero input of one window ``[1, Cin, *roi]``, e.g. to choose ``layer="auto"`` at the windows' size."""
    roi = fall_back_tuple(inferer.roi_size, image.shape[2:])
    return torch.zeros((1, image.shape[1], *roi), dtype=image.dtype, device=image.device)


def stitch_device(inferer: Any, image: torch.Tensor) -> torch.device:
    """Where the volume-sized buffers live, decided as ``SlidingWindowInferer`` decides it.

    ``inferer.device`` if set; else the CPU when ``cpu_thresh`` is set and the volume has more voxels than it (a
    large volume is stitched in host memory while the windows run on the GPU); else the image's device.
    """
    if inferer.device is not None:
        return torch.device(inferer.device)
    thresh = getattr(inferer, "cpu_thresh", None)
    if thresh is not None and math.prod(image.shape[2:]) > thresh:
        return torch.device("cpu")
    return image.device


class WindowGrid:
    """MONAI's window grid and normalised blending weights for one (padded) volume.

    Attributes:
        roi_size: window size per spatial dim.
        pad: F.pad-style padding (last dim first) applied to reach at least ``roi_size``.
        padded_size: spatial size after padding.
        slices: one tuple of spatial slices per window (MONAI order).
        importance: ``[*roi_size]`` blending weight ``omega`` (float32, on ``sw_device``).

    The normaliser ``sum_w omega_w`` is a volume-sized count map only when many windows run (:meth:`full_count`);
    for a few windows (a small ROI) it is formed per window from the windows that overlap it, adding in MONAI's
    window order as the count map does (bit-equal), so that no volume is held for it.
    """

    def __init__(self, inferer: Any, spatial: tuple[int, ...], sw_device: torch.device, device: torch.device):
        nd = len(spatial)
        self.spatial = spatial
        self.roi_size = tuple(fall_back_tuple(inferer.roi_size, spatial))
        pad: list[int] = []
        for k in range(nd - 1, -1, -1):  # as MONAI: symmetric padding up to roi_size, last dim first
            diff = max(self.roi_size[k] - spatial[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.pad = pad
        self.padded_size = tuple(max(s, r) for s, r in zip(spatial, self.roi_size))
        overlap = ensure_tuple_rep(inferer.overlap, nd)
        interval = _get_scan_interval(self.padded_size, self.roi_size, nd, overlap)
        self.slices: list[tuple[Any, ...]] = dense_patch_slices(self.padded_size, self.roi_size, interval)
        patch = get_valid_patch_size(self.padded_size, self.roi_size)
        mode = look_up_option(inferer.mode, BlendMode)
        self.importance = compute_importance_map(
            patch, mode=mode, sigma_scale=inferer.sigma_scale, device=sw_device, dtype=torch.float32
        )
        self.device = device
        self.count: torch.Tensor | None = None  # [*padded_size] sum_w omega_w, when many windows run
        # offset of the original volume inside the padded one, per spatial dim
        self.crop = tuple(slice(pad[2 * (nd - 1 - d)], pad[2 * (nd - 1 - d)] + spatial[d]) for d in range(nd))

    def full_count(self) -> None:
        """Build the volume-sized count map ``sum_w omega_w`` (on the stitching device), for passes over many
        windows."""
        if self.count is None:
            count = torch.zeros(self.padded_size, dtype=torch.float32, device=self.device)
            imp = self.importance.to(self.device)
            for s in self.slices:
                count[s] += imp
            self.count = count

    def blend_weight(self, index: int, device: torch.device) -> torch.Tensor:
        """Normalised weight ``omega_w / sum_w' omega_w'`` of window ``index``: ``[*roi_size]``."""
        imp = self.importance.to(device)
        here = self.slices[index]
        if self.count is not None:
            return imp / self.count[here].to(device)
        count = torch.zeros(self.roi_size, dtype=torch.float32, device=device)
        for other in self.slices:  # MONAI's order, as its count map adds them
            inter = [(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(here, other)]
            if all(lo < hi for lo, hi in inter):
                dst = tuple(slice(lo - a.start, hi - a.start) for (lo, hi), a in zip(inter, here))
                src = tuple(slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(inter, other))
                count[dst] += imp[src]
        return imp / count

    def pad_tensor(self, x: torch.Tensor, padding_mode: str = "constant", cval: float = 0.0) -> torch.Tensor:
        if not any(self.pad):
            return x
        return F.pad(x, pad=self.pad, mode=look_up_option(padding_mode, PytorchPadMode), value=cval)

    def pad_zeros(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, pad=self.pad) if any(self.pad) else x


class ChannelSparse:
    """One target's output gradient ``dS/dY`` on the padded grid, stored on its non-zero channels only.

    A class, mask or box target puts weight on one output channel; holding all ``C`` channels of a whole volume
    for each target would cost ``C`` times the memory (on a 4x240x240x155 BraTS case: 107 MB per target instead
    of 36 MB). Probability scores (sigmoid/softmax) may touch every channel and are held whole.

    Only the bounding box of the non-zero values is held: a small ROI of a large volume costs its box, not the
    volume (issue 30).

    Attributes:
        channels: indices of the channels with a non-zero value (sorted).
        values: ``[B, len(channels), *box]`` float32 gradient on those channels inside the box.
        lo: the box's first voxel on the padded grid (per spatial dim); zero outside the box.
    """

    def __init__(self, channels: list[int], values: torch.Tensor, lo: tuple[int, ...] | None = None):
        self.channels, self.values = channels, values
        self.lo = lo if lo is not None else (0,) * (values.ndim - 2)

    @classmethod
    def from_dense(cls, grad: torch.Tensor, grid: WindowGrid) -> ChannelSparse:
        """From a dense ``[B, C, *S]`` gradient on the unpadded grid (kept on its non-zero channels and box)."""
        nonzero = grad.flatten(2).ne(0).any(dim=2).any(dim=0)  # [C]
        channels = [int(c) for c in torch.nonzero(nonzero).flatten().tolist()]
        if not channels:
            return cls(channels, grad[:, :0].float())
        nz = grad[:, channels].ne(0).flatten(0, 1).any(dim=0)  # [*S]
        box = tuple(span(nz.movedim(d, 0).flatten(1).any(dim=1)) for d in range(nz.ndim))
        return cls.from_box(channels, box, grad[_ix(slice(None), channels, *box)], grid)

    @classmethod
    def from_box(
        cls, channels: list[int], box: tuple[slice, ...], values: torch.Tensor, grid: WindowGrid
    ) -> ChannelSparse:
        """From ``values`` ``[B, len(channels), *box]`` inside ``box`` (slices of the unpadded grid)."""
        lo = tuple(s.start + c.start for s, c in zip(box, grid.crop))  # onto the padded grid
        return cls(channels, values.float().contiguous(), lo)

    def _overlap(self, window: tuple[Any, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(slices in the box, slices in the window) of their intersection; None if they do not meet."""
        inter = [(max(w.start, lo), min(w.stop, lo + n)) for w, lo, n in zip(window, self.lo, self.values.shape[2:])]
        if any(a >= b for a, b in inter):
            return None
        in_box = tuple(slice(a - lo, b - lo) for (a, b), lo in zip(inter, self.lo))
        in_win = tuple(slice(a - w.start, b - w.start) for (a, b), w in zip(inter, window))
        return in_box, in_win

    def touches(self, b: int, window: tuple[Any, ...]) -> bool:
        """Whether sample ``b`` has gradient inside ``window`` (else that window is skipped for this target)."""
        where = self._overlap(window) if self.channels else None
        return where is not None and bool(self.values[_ix(b, slice(None), *where[0])].ne(0).any())

    def window(self, b: int, window: tuple[Any, ...], device: torch.device) -> torch.Tensor:
        """``[len(channels), *roi]`` values of sample ``b`` inside ``window`` (zero outside the box)."""
        out = torch.zeros((len(self.channels), *(w.stop - w.start for w in window)), device=device)
        where = self._overlap(window)
        if where is not None:
            out[_ix(slice(None), *where[1])] = self.values[_ix(b, slice(None), *where[0])].to(device)
        return out


@dataclass
class SlidingState:
    """What the passes of one sliding-window explanation share.

    Made by :func:`open_state`; :func:`reference_pass` fills ``output``/``n_out``, :func:`target_gradients`
    ``grads``/``active``/``scores``/``voxels``, the later passes ``acc`` (the stitched maps), ``pooled``,
    ``act_stats`` and ``feat_shape``.
    """

    runner: ModelRunner
    method: Formula
    inferer: Any
    hook: ActivationHook
    grid: WindowGrid
    x_pad: torch.Tensor  # [B, Cin, *padded] the padded image
    n_targets: int
    device: torch.device  # where volume-sized buffers live
    sw_device: torch.device  # where windows run
    upsampler: Upsampler
    progress: bool
    output: torch.Tensor | None = None  # the blended output [B, C, *S] when known
    n_out: int = 0
    grads: list[ChannelSparse] = field(default_factory=list)  # dS/dY per target
    active: list[list[list[int]]] = field(default_factory=list)  # [b][i] -> targets with gradient in that window
    scores: list[torch.Tensor] = field(default_factory=list)  # per target [B] float64
    voxels: list[torch.Tensor] = field(default_factory=list)  # per target [B]
    acc: torch.Tensor | None = None  # [B, K, *box] stitched maps, on the box of the windows stitched into
    acc_lo: tuple[int, ...] = ()  # the box's first voxel on the padded grid
    pooled: dict[tuple[int, int], Statistics] = field(default_factory=dict)  # gradient statistics per (b, target)
    act_stats: dict[int, Statistics] = field(default_factory=dict)  # activation statistics of the volume per b
    feat_shape: tuple[int, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.x_pad.shape[0])

    def all_windows(self) -> list[WindowRef]:
        return [(b, i) for b in range(self.batch_size) for i in range(len(self.grid.slices))]

    def batches(self, refs: list[WindowRef]) -> list[list[WindowRef]]:
        """``refs`` in batches of ``sw_batch_size``."""
        n = self.inferer.sw_batch_size
        return [refs[j : j + n] for j in range(0, len(refs), n)]

    def windows(self, batch: list[WindowRef]) -> torch.Tensor:
        """The input windows ``[n, Cin, *roi]`` of a batch, on ``sw_device``."""
        x = self.x_pad
        return torch.cat([x[(slice(b, b + 1), slice(None), *self.grid.slices[i])] for b, i in batch]).to(self.sw_device)

    def blend(self, batch: list[WindowRef]) -> torch.Tensor:
        """Normalised blending weights ``[n, *roi]`` of a batch's windows."""
        return torch.stack([self.grid.blend_weight(i, self.sw_device) for _, i in batch])

    def open_acc(self, refs: list[WindowRef]) -> None:
        """Make the map accumulator cover the windows ``refs`` (besides what it covers): the box of the windows that
        are stitched into, so that a small ROI's maps cost windows, not the volume (issue 30)."""
        if not refs:
            return
        spans = [self.grid.slices[i] for _, i in refs]
        nd = len(self.grid.padded_size)
        lo = [min(s[d].start for s in spans) for d in range(nd)]
        hi = [max(s[d].stop for s in spans) for d in range(nd)]
        if self.acc is not None:
            lo = [min(a, b) for a, b in zip(lo, self.acc_lo)]
            hi = [max(a, b + n) for a, b, n in zip(hi, self.acc_lo, self.acc.shape[2:])]
            if tuple(lo) == self.acc_lo and tuple(hi) == tuple(a + n for a, n in zip(self.acc_lo, self.acc.shape[2:])):
                return
        acc = torch.zeros((self.batch_size, self.n_targets, *(b - a for a, b in zip(lo, hi))), device=self.device)
        if self.acc is not None:
            acc[(slice(None), slice(None), *self._in_acc(self.acc_lo, self.acc.shape[2:], lo))] = self.acc
        self.acc, self.acc_lo = acc, tuple(lo)

    @staticmethod
    def _in_acc(start: Sequence[int], size: Sequence[int], lo: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(a - o, a - o + n) for a, n, o in zip(start, size, lo))

    def stitch(self, batch: list[WindowRef], k: int, maps: torch.Tensor, which: list[int] | None = None) -> None:
        """Add window maps ``maps[j]`` ``[*roi]`` into target ``k``'s volume (only the batch rows ``which``)."""
        assert self.acc is not None
        for j, (b, i) in enumerate(batch):
            if which is None or j in which:
                s = self.grid.slices[i]
                where = self._in_acc([x.start for x in s], [x.stop - x.start for x in s], self.acc_lo)
                self.acc[_ix(b, k, *where)] += maps[j].to(self.device)

    def stitched(self) -> torch.Tensor:
        """The stitched maps cropped to the unpadded volume, ``[B, K, *S]`` (zero outside the stitched box)."""
        spatial = self.grid.spatial
        out = torch.zeros((self.batch_size, self.n_targets, *spatial), device=self.device)
        if self.acc is None:
            return out
        crop = self.grid.crop
        inter = [(max(c.start, a), min(c.stop, a + n)) for c, a, n in zip(crop, self.acc_lo, self.acc.shape[2:])]
        if all(a < b for a, b in inter):
            dst = tuple(slice(a - c.start, b - c.start) for (a, b), c in zip(inter, crop))
            src = tuple(slice(a - o, b - o) for (a, b), o in zip(inter, self.acc_lo))
            out[(slice(None), slice(None), *dst)] = self.acc[(slice(None), slice(None), *src)]
        return out

    def bar(self, items: list[Any], desc: str) -> Iterator[Any]:
        return iter(tqdm(items, desc=desc, disable=not self.progress))


def explain_sliding(
    runner: ModelRunner,
    method: Formula,
    targets: list[Target],
    image: torch.Tensor,
    inferer: Any,
    *,
    upsampler: Upsampler = interpolate_upsampler,
    relu: bool = True,
    upsample: bool = True,
    progress: bool = False,
    output: torch.Tensor | None = None,
) -> CAMResult:
    """Sliding-window explanation of ``image`` ``[B, Cin, *S]``; see the module docstring for the exact semantics.

    ``runner``'s layer must be resolved (on a window, see :func:`window_example`). ``output``: the blended model
    output ``[B, C, *S]`` if the caller already has it (skips pass 0).
    """
    if not upsample:
        raise MedcamError("upsample=False is not available with an inferer: window maps are stitched on the input grid")
    if not isinstance(method, (ElementwiseFormula, PooledFormula)):
        raise MedcamError(f"the sliding-window executor needs an element-wise or pooled formula, got {method!r}")
    with runner.session("grad") as hook:
        st = open_state(runner, method, len(targets), image, inferer, hook, upsampler=upsampler, progress=progress)
        reference = reference_pass(st, image, targets, output)
        target_gradients(st, targets, reference)
        del reference
        if isinstance(method, ActivationPooledFormula) and st.stats["backward_windows"]:
            activation_statistics_pass(st)
        gradient_pass(st)
        if isinstance(method, PooledFormula) and st.pooled:
            map_pass(st)
    maps = st.stitched()
    st.acc = None
    if relu:
        maps = maps.relu_()
    return CAMResult(
        maps=maps.contiguous(),  # on the stitching device, like MONAI's blended output
        scores=torch.stack(st.scores, dim=1).float(),
        roi_voxels=torch.stack(st.voxels, 1),
        targets=targets,
        layer=str(runner.layer_name),
        feature_shape=st.feat_shape,
        output=st.output,
        stats=st.stats,
    )


def open_state(
    runner: ModelRunner,
    method: Formula,
    n_targets: int,
    image: torch.Tensor,
    inferer: Any,
    hook: ActivationHook,
    *,
    upsampler: Upsampler = interpolate_upsampler,
    progress: bool = False,
) -> SlidingState:
    """The shared state of one sliding-window explanation of ``image`` ``[B, Cin, *S]`` for ``n_targets`` maps:
    MONAI's grid and blending weights, the padded image; the map accumulator ``acc`` is opened by the passes that
    stitch, on the box of their windows (:meth:`SlidingState.open_acc`).

    ``hook`` is the runner's open session (:meth:`ModelRunner.session`); every pass switches its mode as it needs.
    """
    check_inferer(inferer)
    sw_device = torch.device(inferer.sw_device) if inferer.sw_device is not None else image.device
    device = stitch_device(inferer, image)
    grid = WindowGrid(inferer, tuple(image.shape[2:]), sw_device, device)
    return SlidingState(
        runner=runner,
        method=method,
        inferer=inferer,
        hook=hook,
        grid=grid,
        x_pad=grid.pad_tensor(image, inferer.padding_mode, inferer.cval),
        n_targets=n_targets,
        device=device,
        sw_device=sw_device,
        upsampler=upsampler,
        progress=bool(inferer.progress or progress),
        stats={"windows": len(grid.slices) * image.shape[0], "backward_windows": 0, "activation_windows": 0},
    )


def reference_pass(
    st: SlidingState, image: torch.Tensor, targets: list[Target], output: torch.Tensor | None
) -> torch.Tensor:
    """Pass 0: the tensor the targets' weights are taken on, ``[B, C, *S]`` on the stitching device.

    The caller's blended ``output``; else, when the ROI or the score needs the prediction, one no-grad
    ``sliding_window_inference`` with the inferer's settings (both stored in ``st.output``); else (logits score with
    a prediction-free ROI) a zero-stride stand-in of the output's shape, whose channel count one window tells.
    """
    bsz, spatial, inf = st.batch_size, st.grid.spatial, st.inferer
    runner = st.runner
    if output is not None:
        output = output.as_tensor() if hasattr(output, "as_tensor") else output
        if output.shape[0] != bsz or tuple(output.shape[2:]) != spatial:
            raise MedcamError(
                f"output has shape {tuple(output.shape)} but the image is {tuple(image.shape)}: pass the blended "
                "output of sliding_window_inference on this image"
            )
        st.output = reference = output.detach().float().to(st.device)
    elif runner.score == "probability" or any(t.needs_prediction for t in targets):
        with st.hook.mode_as("detach"), torch.no_grad(), runner.autocast(st.sw_device):
            blended = sliding_window_inference(
                image,
                st.grid.roi_size,
                inf.sw_batch_size,
                runner.hooked_predictor(st.hook),
                overlap=inf.overlap,
                mode=inf.mode,
                sigma_scale=inf.sigma_scale,
                padding_mode=inf.padding_mode,
                cval=inf.cval,
                sw_device=st.sw_device,
                device=st.device,
                progress=st.progress,
            )
        assert isinstance(blended, torch.Tensor)
        blended = blended.as_tensor() if hasattr(blended, "as_tensor") else blended
        st.output = reference = blended.float()
    else:
        first = st.x_pad[(slice(0, 1), slice(None), *st.grid.slices[0])].to(st.sw_device)
        n_out = runner.output_channels(first, st.hook)
        reference = torch.zeros((), device=st.device).expand(bsz, n_out, *spatial)
    if tuple(reference.shape[2:]) != spatial:
        raise MedcamError(f"the model output {tuple(reference.shape)} is not on the input grid {spatial}")
    st.n_out = int(reference.shape[1])
    return reference


def target_gradients(st: SlidingState, targets: list[Target], reference: torch.Tensor) -> None:
    """Output gradients ``dS/dY`` per target (padded, on their non-zero channels), scores, ROI sizes, and which
    targets have gradient in each window (the others are skipped there)."""
    for t in targets:
        boxed = _boxed_weights(t, reference) if st.output is None else None
        if boxed is not None:  # a logits score of a boxed ROI: its weights are its gradient, held on its box
            box, values = boxed
            st.voxels.append((values != 0).flatten(1).sum(1).cpu())
            st.scores.append(torch.zeros(st.batch_size, dtype=torch.float64))  # summed over windows in pass 1
            st.grads.append(ChannelSparse.from_box([t.channel], box, values[:, None], st.grid))
            continue
        w = t.score_weights(reference)
        st.voxels.append((t.roi(reference) != 0).flatten(1).sum(1).cpu())
        if st.output is not None:
            g, s = st.runner.output_gradient(st.output, w)
            st.scores.append(s.cpu().double())
        else:
            g = w
            st.scores.append(torch.zeros(st.batch_size, dtype=torch.float64))  # summed over windows in pass 1
        del w
        sparse = ChannelSparse.from_dense(g, st.grid)
        del g
        if not sparse.channels:
            logger.warning("target %r has an empty ROI: its map is all zero", t)
        st.grads.append(sparse)
    st.active = [
        [[k for k, g in enumerate(st.grads) if g.touches(b, s)] for s in st.grid.slices] for b in range(st.batch_size)
    ]
    st.stats["backward_windows"] = sum(bool(ks) for row in st.active for ks in row)


def _boxed_weights(t: Target, reference: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor] | None:
    """``t``'s score weights as (box, values ``[B, *box]``) on its channel when it has a boxed form and the
    base class's one-channel weights (``W = M`` on channel ``c``); else None (dense weights)."""
    if type(t).score_weights is not Target.score_weights:
        return None
    boxed = t.boxed_roi(reference)
    if boxed is None:
        return None
    if not 0 <= t.channel < reference.shape[1]:
        return None  # score_weights raises the error
    return boxed


def activation_statistics_pass(st: SlidingState) -> None:
    """Pass A (:class:`~medcam.formulas.ActivationPooledFormula`): forward to the layer only, every window, summing
    the blended activation statistics of the volume per sample. First, because Grad-CAM++ needs the volume's
    activation sums inside the gradient statistics of pass 1."""
    assert isinstance(st.method, ActivationPooledFormula)
    refs = st.all_windows()
    st.grid.full_count()
    with st.hook.mode_as("stop"):
        for batch in st.bar(st.batches(refs), "medcam statistics"):
            aw = st.runner.activations(st.windows(batch), st.hook)
            weight = _to_feature_grid(st.blend(batch)[:, None], tuple(aw.shape[2:]))
            stats = st.method.activation_statistics(aw, weight)
            for j, (b, _) in enumerate(batch):
                _add(st.act_stats.setdefault(b, {}), {n: v[j] for n, v in stats.items()})
    st.stats["activation_windows"] += len(refs)


def gradient_pass(st: SlidingState) -> None:
    """Pass 1: forward + backward of the windows that touch an ROI; element-wise maps are stitched, pooled
    gradient statistics summed."""
    todo = [(b, i) for b, i in st.all_windows() if st.active[b][i]]
    if 8 * len(todo) > len(st.grid.slices):  # many windows: one count map is cheaper than one per window
        st.grid.full_count()
    if isinstance(st.method, ElementwiseFormula):
        st.open_acc(todo)
    for batch in st.bar(st.batches(todo), "medcam windows"):
        y, a = st.runner.forward(st.windows(batch), st.hook)
        if tuple(y.shape[2:]) != st.grid.roi_size:
            raise MedcamError(f"the model output {tuple(y.shape)} is not on the window grid {st.grid.roi_size}")
        af = st.runner.to_feature_map(a.detach(), st.grid.roi_size)
        st.feat_shape = tuple(af.shape[2:])
        ks = sorted({k for b, i in batch for k in st.active[b][i]})
        blend = st.blend(batch)
        for n, k in enumerate(ks):
            gw = _window_gradient(st, batch, k, blend)
            g = st.runner.activation_grad(y, a, gw, retain_graph=n < len(ks) - 1)
            g = st.runner.to_feature_map(g, st.grid.roi_size)
            if st.output is None:  # S = sum_w sum_u dS/dy_w * y_w (exact for logits)
                _add_window_scores(st, batch, k, gw, y)
            del gw
            _use_window_gradient(st, batch, k, af, g)
            del g
        del y, a, af


def _window_gradient(st: SlidingState, batch: list[WindowRef], k: int, blend: torch.Tensor) -> torch.Tensor:
    """Equation (1) for target ``k`` on a batch: ``dS/dy_w`` ``[n, C, *roi]`` (zero where ``k`` is inactive).

    Built just before its own backward pass and dropped after it, so only one target's window-sized gradient is
    alive at a time."""
    grad = st.grads[k]
    gw = torch.zeros((len(batch), st.n_out, *st.grid.roi_size), device=st.sw_device)
    for j, (b, i) in enumerate(batch):
        if k in st.active[b][i]:
            gw[j, grad.channels] = grad.window(b, st.grid.slices[i], st.sw_device) * blend[j]
    return gw


def _add_window_scores(st: SlidingState, batch: list[WindowRef], k: int, gw: torch.Tensor, y: torch.Tensor) -> None:
    ch = st.grads[k].channels
    per_win = (gw[:, ch] * y.detach()[:, ch].float()).flatten(1).sum(1).double().cpu()
    for j, (b, _) in enumerate(batch):
        st.scores[k][b] += per_win[j]


def _use_window_gradient(st: SlidingState, batch: list[WindowRef], k: int, af: torch.Tensor, g: torch.Tensor) -> None:
    """Target ``k``'s activation gradient ``g`` ``[n, K, *f]`` of a batch: stitch the element-wise map, or add the
    pooled statistics of the windows where ``k`` is active."""
    method = st.method
    if isinstance(method, ElementwiseFormula):
        m = st.upsampler(method.map(af, g)[:, None], st.grid.roi_size)[:, 0]
        st.stitch(batch, k, m)
        return
    assert isinstance(method, PooledFormula)
    volume_stats = None
    if st.act_stats:  # the whole volume's activation statistics, one row per window of the batch
        names = st.act_stats[batch[0][0]]
        volume_stats = {n: torch.stack([st.act_stats[b][n] for b, _ in batch]) for n in names}
    stats = method.gradient_statistics(af, g, volume_stats)
    for j, (b, i) in enumerate(batch):
        if k in st.active[b][i]:
            _add(st.pooled.setdefault((b, k), {}), {n: v[j] for n, v in stats.items()})


def map_pass(st: SlidingState) -> None:
    """Pass 2 (pooled formulas): global channel weights ``alpha`` per (sample, target) from the summed statistics,
    then :func:`blend_pooled_maps`."""
    assert isinstance(st.method, PooledFormula)
    n_pos = _feature_positions(st.grid.spatial, st.grid.roi_size, st.feat_shape)
    alpha = {
        (b, k): st.method.weights(
            {n: v[None] for n, v in {**stats, **st.act_stats.get(b, {})}.items()}, n_pos, st.runner.layer_name
        )[0]
        for (b, k), stats in st.pooled.items()
    }
    blend_pooled_maps(st, alpha)


def blend_pooled_maps(st: SlidingState, alpha: dict[WindowRef, torch.Tensor]) -> None:
    """Forward to the layer only, for every window, blending ``sum_k alpha_k A_wk`` into ``st.acc``.

    ``alpha``: channel weights ``[K]`` per ``(sample b, target k)``; targets without an entry get no map. Also the
    map pass of methods whose weights come from elsewhere (MI-CAM's mutual information)."""
    refs = st.all_windows()
    st.grid.full_count()
    st.open_acc([r for r in refs if any((r[0], k) in alpha for k in range(st.n_targets))])
    with st.hook.mode_as("stop"):
        for batch in st.bar(st.batches(refs), "medcam maps"):
            aw = st.runner.activations(st.windows(batch), st.hook)
            st.feat_shape = tuple(aw.shape[2:])
            for j, (b, i) in enumerate(batch):
                ks = [k for k in range(st.n_targets) if (b, k) in alpha]
                if not ks:
                    continue
                al = torch.stack([alpha[(b, k)] for k in ks]).to(st.sw_device)  # [k, K]
                m = _weighted_channel_sum(al, aw[j : j + 1].expand(len(ks), *aw.shape[1:]))
                m = st.upsampler(m[None], st.grid.roi_size)[0] * st.grid.blend_weight(i, st.sw_device)
                for kk, k in enumerate(ks):
                    st.stitch([(b, i)], k, m[kk : kk + 1])
    st.stats["activation_windows"] += len(refs)


# ---------------------------------------------------------------------------------------------------- helpers
def _ix(*parts: Any) -> tuple[Any, ...]:
    """A tensor index from integers, slices and index lists (typed for mypy)."""
    return parts


def _to_feature_grid(weight: torch.Tensor, feat_shape: tuple[int, ...]) -> torch.Tensor:
    """Average a window-grid weight ``[n, 1, *roi]`` down to the feature grid ``[n, 1, *f]`` (area pooling)."""
    if tuple(weight.shape[2:]) == feat_shape:
        return weight
    pools: dict[int, Callable[..., torch.Tensor]] = {
        1: F.adaptive_avg_pool1d,
        2: F.adaptive_avg_pool2d,
        3: F.adaptive_avg_pool3d,
    }
    return pools[weight.ndim - 2](weight, feat_shape)


def _feature_positions(spatial: tuple[int, ...], roi_size: tuple[int, ...], feat_shape: tuple[int, ...]) -> float:
    """N: feature-grid positions covering the whole (unpadded) volume, at the layer's stride."""
    return float(math.prod(s * f / r for s, f, r in zip(spatial, feat_shape, roi_size)))


def _add(slot: Statistics, stats: Statistics) -> None:
    for n, v in stats.items():
        slot[n] = slot[n] + v if n in slot else v.detach().clone()
