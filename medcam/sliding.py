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
from collections.abc import Callable, Iterator
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
from .targets import Target

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
        count: ``[*padded_size]`` ``sum_w omega_w`` (float32, on ``device``).
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
        count = torch.zeros(self.padded_size, dtype=torch.float32, device=device)
        imp = self.importance.to(device)
        for s in self.slices:
            count[s] += imp
        self.count = count
        # offset of the original volume inside the padded one, per spatial dim
        self.crop = tuple(slice(pad[2 * (nd - 1 - d)], pad[2 * (nd - 1 - d)] + spatial[d]) for d in range(nd))

    def blend_weight(self, index: int, device: torch.device) -> torch.Tensor:
        """Normalised weight ``omega_w / sum_w' omega_w'`` of window ``index``: ``[*roi_size]``."""
        return self.importance.to(device) / self.count[self.slices[index]].to(device)

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

    Attributes:
        channels: indices of the channels with a non-zero value (sorted).
        values: ``[B, len(channels), *padded]`` float32 gradient on those channels.
    """

    def __init__(self, channels: list[int], values: torch.Tensor):
        self.channels, self.values = channels, values

    @classmethod
    def from_dense(cls, grad: torch.Tensor, grid: WindowGrid) -> ChannelSparse:
        """From a dense ``[B, C, *S]`` gradient on the unpadded grid."""
        nonzero = grad.flatten(2).ne(0).any(dim=2).any(dim=0)  # [C]
        channels = [int(c) for c in torch.nonzero(nonzero).flatten().tolist()]
        return cls(channels, grid.pad_zeros(grad[:, channels].float()))

    def touches(self, b: int, window: tuple[Any, ...]) -> bool:
        """Whether sample ``b`` has gradient inside ``window`` (else that window is skipped for this target)."""
        return bool(self.channels) and bool(self.values[(b, slice(None), *window)].ne(0).any())

    def window(self, b: int, window: tuple[Any, ...], device: torch.device) -> torch.Tensor:
        """``[len(channels), *roi]`` values of sample ``b`` inside ``window``."""
        return self.values[(b, slice(None), *window)].to(device)


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
    acc: torch.Tensor | None = None  # [B, K, *padded] stitched maps
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

    def stitch(self, batch: list[WindowRef], k: int, maps: torch.Tensor, which: list[int] | None = None) -> None:
        """Add window maps ``maps[j]`` ``[*roi]`` into target ``k``'s volume (only the batch rows ``which``)."""
        assert self.acc is not None
        for j, (b, i) in enumerate(batch):
            if which is None or j in which:
                self.acc[(b, k, *self.grid.slices[i])] += maps[j].to(self.device)

    def stitched(self) -> torch.Tensor:
        """The stitched maps cropped to the unpadded volume, ``[B, K, *S]``."""
        assert self.acc is not None
        return self.acc[(slice(None), slice(None), *self.grid.crop)]

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
    if relu:
        maps = torch.relu(maps)
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
    MONAI's grid and blending weights, the padded image, zeroed map volumes ``acc`` ``[B, n_targets, *padded]``.

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
        acc=torch.zeros((image.shape[0], n_targets, *grid.padded_size), dtype=torch.float32, device=device),
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


def activation_statistics_pass(st: SlidingState) -> None:
    """Pass A (:class:`~medcam.formulas.ActivationPooledFormula`): forward to the layer only, every window, summing
    the blended activation statistics of the volume per sample. First, because Grad-CAM++ needs the volume's
    activation sums inside the gradient statistics of pass 1."""
    assert isinstance(st.method, ActivationPooledFormula)
    refs = st.all_windows()
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
