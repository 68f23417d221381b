"""Window stitching: explain a whole volume window by window, with MONAI's sliding-window semantics.

Definition (what is explained). MONAI's ``sliding_window_inference`` blends window outputs ``y_w`` with the
importance map ``omega`` (constant or gaussian) of each window:

    Y(u) = sum_w omega_w(u) y_w(u) / sum_w omega_w(u)

and the ROI score is ``S = sum_u W(u) Y(u)`` (``W`` = score weights of the target on the blended output). Hence

    dS/dy_w(u) = W(u) omega_w(u) / sum_w' omega_w'(u)            (1)

and each window is differentiated on its own with (1) as its output gradient: no graph spans two windows, so
memory is that of ``sw_batch_size`` windows whatever the volume size.

* Element-wise methods (Seg-HiRes-Grad-CAM, LayerCAM): each window's pre-ReLU map is formed from its gradient
  (which already carries the blending weight), upsampled to the window size and summed into volume coordinates.
* Pooled methods (Seg-Grad-CAM, XGrad-CAM, Grad-CAM++): channel weights are global. Their statistics (e.g.
  ``sum_u g_k``) are summed over all windows; ``N`` = feature-grid positions covering the whole volume; activation
  sums (XGrad-CAM's denominator, Grad-CAM++'s ``sum_v A_k``) weight each window's feature positions by its normalised
  blending weight, area-averaged onto the feature grid, so that overlaps count once. The per-window maps
  ``sum_k alpha_k A_wk`` are then upsampled and blended with the same normalised importance weights as the output.
  This needs the activations of every window, taken in forward-only passes that stop at the hooked layer.
* ReLU is applied once, on the stitched map.

With one window covering the volume both reduce exactly to the whole-volume result.

Passes: (0) one no-grad ``sliding_window_inference`` when a target needs the prediction (PredictedROI,
ComponentROI) or the score is on probabilities; (A) pooled methods with activation statistics (XGrad-CAM,
Grad-CAM++) only: forward up to the hooked layer for every window, summing the blended activation statistics of the
volume; (1) forward + backward of every window whose slice of the output gradient is non-zero for some target;
windows outside all ROIs get no forward or backward at all; (2) pooled methods only: forward up to the hooked layer
for every window, blending the maps.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.utils import BlendMode, PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option
from tqdm import tqdm

from .engine import BaseSegCAM, CAMResult, run_model, weighted_channel_sum
from .errors import MedcamError
from .hooks import StopForward
from .targets import Target

__all__ = ["explain_sliding", "check_inferer", "stitch_device", "WindowGrid"]

logger = logging.getLogger(__name__)


def check_inferer(inferer: Any, cam: BaseSegCAM) -> None:
    """Refuse inferers medcam cannot follow exactly, with the reason."""
    from monai.inferers import SlidingWindowInferer

    if not isinstance(inferer, SlidingWindowInferer):
        raise MedcamError(
            f"inferer must be a monai.inferers.SlidingWindowInferer, got {type(inferer).__name__}; "
            "for whole-image explanation pass inferer=None"
        )
    if getattr(inferer, "with_coord", False):
        raise MedcamError("SlidingWindowInferer(with_coord=True) is not supported: the predictor must take one tensor")
    if not cam.supports_sliding_window:
        raise MedcamError(
            f"{type(cam).__name__} cannot be explained with a sliding-window inferer: its channel weights are not "
            "additive over windows. Use one of medcam.METHODS, or inferer=None"
        )


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
        self.slices = dense_patch_slices(self.padded_size, self.roi_size, interval)
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


def explain_sliding(
    cam: BaseSegCAM,
    image: torch.Tensor,
    tl: list[Target],
    relu: bool,
    upsample: bool,
    output: torch.Tensor | None = None,
) -> CAMResult:
    """Sliding-window explanation of ``image`` ``[B, Cin, *S]``; see the module docstring for the exact semantics.

    ``output``: the blended model output ``[B, C, *S]`` if the caller already has it (skips pass 0).
    """
    if not upsample:
        raise MedcamError("upsample=False is not available with an inferer: window maps are stitched on the input grid")
    inf = cam.inferer
    sw_device = torch.device(inf.sw_device) if inf.sw_device is not None else image.device
    bsz, _, *spatial_l = image.shape
    spatial = tuple(spatial_l)
    device = stitch_device(inf, image)
    grid = WindowGrid(inf, spatial, sw_device, device)
    progress = bool(inf.progress or cam.progress)
    stats: dict[str, Any] = {"windows": len(grid.slices) * bsz, "backward_windows": 0, "activation_windows": 0}

    with cam.hooked("grad") as hook:
        # ---- pass 0: the blended output, when the ROI or the score needs it (and the caller did not give it)
        if output is not None:
            output = output.as_tensor() if hasattr(output, "as_tensor") else output
            if output.shape[0] != bsz or tuple(output.shape[2:]) != spatial:
                raise MedcamError(
                    f"output has shape {tuple(output.shape)} but the image is {tuple(image.shape)}: pass the blended "
                    "output of sliding_window_inference on this image"
                )
            output = output.detach().float().to(device)
            reference = output
        elif cam.score == "probability" or any(t.needs_prediction for t in tl):
            hook.mode = "detach"
            with torch.no_grad(), cam.autocast(sw_device):
                output = sliding_window_inference(
                    image,
                    grid.roi_size,
                    inf.sw_batch_size,
                    lambda x: cam.select_output(run_model(cam.model, _reset(hook, x))),
                    overlap=inf.overlap,
                    mode=inf.mode,
                    sigma_scale=inf.sigma_scale,
                    padding_mode=inf.padding_mode,
                    cval=inf.cval,
                    sw_device=sw_device,
                    device=device,
                    progress=progress,
                )
            output = output.as_tensor() if hasattr(output, "as_tensor") else output
            output = output.float()
            hook.mode = "grad"
            reference = output
        else:
            # logits score with a prediction-free ROI: only the output's shape is needed; one window tells the
            # channel count (once per explainer), and a zero-stride tensor stands in for the blended output
            n_out = cam._output_channels
            if n_out is None:
                first = grid.pad_tensor(image[:1], inf.padding_mode, inf.cval)[
                    (slice(None), slice(None), *grid.slices[0])
                ]
                hook.mode = "detach"
                with torch.no_grad(), cam.autocast(sw_device):
                    n_out = cam.select_output(run_model(cam.model, _reset(hook, first.to(sw_device)))).shape[1]
                cam._output_channels = n_out
            hook.mode = "grad"
            reference = torch.zeros((), device=device).expand(bsz, n_out, *spatial)
        if tuple(reference.shape[2:]) != spatial:
            raise MedcamError(f"the model output {tuple(reference.shape)} is not on the input grid {spatial}")

        # ---- output gradients dS/dY per target (padded to the window grid, kept on their non-zero channels only),
        # scores, ROI sizes
        grads: list[ChannelSparse] = []
        scores, voxels = [], []
        for t in tl:
            w = t.score_weights(reference)
            voxels.append((t.roi(reference) != 0).flatten(1).sum(1).cpu())
            if output is not None:
                g, s = cam.output_gradient(output, w)
                scores.append(s.cpu().double())
            else:
                g = w
                scores.append(torch.zeros(bsz, dtype=torch.float64))  # summed over windows in pass 1
            del w
            sparse = ChannelSparse.from_dense(g, grid)
            del g
            if not sparse.channels:
                logger.warning("target %r has an empty ROI: its map is all zero", t)
            grads.append(sparse)
        n_out = reference.shape[1]

        # which targets have gradient in each (sample, window): the others are skipped
        active = [[[k for k, g in enumerate(grads) if g.touches(b, s)] for s in grid.slices] for b in range(bsz)]
        todo = [(b, i) for b in range(bsz) for i in range(len(grid.slices)) if active[b][i]]
        stats["backward_windows"] = len(todo)

        x_pad = grid.pad_tensor(image, inf.padding_mode, inf.cval)
        acc = torch.zeros((bsz, len(tl), *grid.padded_size), dtype=torch.float32, device=device)
        pooled: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # gradient statistics per (sample, target)
        act_stats: dict[int, dict[str, torch.Tensor]] = {}  # activation statistics of the whole volume per sample
        feat_shape: tuple[int, ...] = ()
        pairs = [(b, i) for b in range(bsz) for i in range(len(grid.slices))]
        all_batches = [pairs[j : j + inf.sw_batch_size] for j in range(0, len(pairs), inf.sw_batch_size)]

        # ---- pass A (pooled methods with activation statistics): forward to the layer only, every window; first,
        # because Grad-CAM++ needs the volume's activation sums inside the gradient statistics of pass 1
        if not cam.elementwise and cam.uses_activation_statistics and todo:
            hook.mode = "stop"
            for batch in tqdm(all_batches, desc="medcam statistics", disable=not progress):
                aw = _activations(cam, hook, x_pad, grid, batch, sw_device)
                blend = torch.stack([grid.blend_weight(i, sw_device) for _, i in batch])[:, None]
                st = cam.activation_statistics(aw, _to_feature_grid(blend, tuple(aw.shape[2:])))
                for j, (b, _) in enumerate(batch):
                    _add(act_stats.setdefault(b, {}), {n: v[j] for n, v in st.items()})
            stats["activation_windows"] += len(pairs)
            hook.mode = "grad"

        # ---- pass 1: forward + backward of the windows that touch an ROI
        batches = [todo[j : j + inf.sw_batch_size] for j in range(0, len(todo), inf.sw_batch_size)]
        for batch in tqdm(batches, desc="medcam windows", disable=not progress):
            xw = torch.cat([x_pad[(slice(b, b + 1), slice(None), *grid.slices[i])] for b, i in batch]).to(sw_device)
            y, a = cam.forward(xw, hook)
            if tuple(y.shape[2:]) != grid.roi_size:
                raise MedcamError(f"the model output {tuple(y.shape)} is not on the window grid {grid.roi_size}")
            af = cam.to_feature_map(a.detach(), grid.roi_size)
            feat_shape = tuple(af.shape[2:])
            ks = sorted({k for b, i in batch for k in active[b][i]})
            blend = torch.stack([grid.blend_weight(i, sw_device) for _, i in batch])  # [n, *roi]

            def window_gradient(k: int) -> torch.Tensor:
                """Equation (1) for target k on this batch: dS/dy_w ``[n, C, *roi]`` (zero where k is inactive)."""
                gw = torch.zeros((len(batch), n_out, *grid.roi_size), device=sw_device)
                for j, (b, i) in enumerate(batch):
                    if k in active[b][i]:
                        gw[j, grads[k].channels] = grads[k].window(b, grid.slices[i], sw_device) * blend[j]
                return gw

            for k, gw, g in _target_gradients(cam, y, a, ks, window_gradient):
                g = cam.to_feature_map(g, grid.roi_size)
                if output is None:  # S = sum_w sum_u dS/dy_w * y_w (exact for logits)
                    ch = grads[k].channels
                    per_win = (gw[:, ch] * y.detach()[:, ch].float()).flatten(1).sum(1).double().cpu()
                    for j, (b, _) in enumerate(batch):
                        scores[k][b] += per_win[j]
                del gw
                if cam.elementwise:
                    m = cam.upsampler(cam.elementwise_map(af, g)[:, None], grid.roi_size)[:, 0]
                    for j, (b, i) in enumerate(batch):
                        acc[(b, k, *grid.slices[i])] += m[j].to(device)
                    del m
                else:
                    volume_stats = None
                    if act_stats:  # the whole volume's activation statistics, one row per window of the batch
                        volume_stats = {
                            n: torch.stack([act_stats[b][n] for b, _ in batch]) for n in act_stats[batch[0][0]]
                        }
                    st = cam.gradient_statistics(af, g, volume_stats)
                    for j, (b, i) in enumerate(batch):
                        if k in active[b][i]:
                            _add(pooled.setdefault((b, k), {}), {n: v[j] for n, v in st.items()})
                del g
            del y, a, af

        # ---- pass 2 (pooled methods): forward to the layer only, for every window: blend sum_k alpha_k A_wk
        if not cam.elementwise and pooled:
            hook.mode = "stop"
            n_pos = _feature_positions(spatial, grid.roi_size, feat_shape)
            alpha = {
                (b, k): cam.weights_from_statistics(
                    {n: v[None] for n, v in {**st, **act_stats.get(b, {})}.items()}, n_pos
                )[0]
                for (b, k), st in pooled.items()
            }
            for batch in tqdm(all_batches, desc="medcam maps", disable=not progress):
                aw = _activations(cam, hook, x_pad, grid, batch, sw_device)
                for j, (b, i) in enumerate(batch):
                    ks = [k for k in range(len(tl)) if (b, k) in alpha]
                    if not ks:
                        continue
                    al = torch.stack([alpha[(b, k)] for k in ks]).to(sw_device)  # [k, K]
                    m = weighted_channel_sum(al, aw[j : j + 1].expand(len(ks), *aw.shape[1:]))
                    m = cam.upsampler(m[None], grid.roi_size)[0] * grid.blend_weight(i, sw_device)
                    for kk, k in enumerate(ks):
                        acc[(b, k, *grid.slices[i])] += m[kk].to(device)
            stats["activation_windows"] += len(pairs)
            hook.mode = "grad"

    maps = acc[(slice(None), slice(None), *grid.crop)]
    if relu:
        maps = torch.relu(maps)
    return CAMResult(
        maps=maps.contiguous(),  # on the stitching device, like MONAI's blended output
        scores=torch.stack(scores, dim=1).float(),
        roi_voxels=torch.stack(voxels, 1),
        targets=tl,
        layer=str(cam.layer_name),
        feature_shape=feat_shape,
        output=output,
        stats=stats,
    )


# ---------------------------------------------------------------------------------------------------- helpers
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

    def touches(self, b: int, window: tuple[slice, ...]) -> bool:
        """Whether sample ``b`` has gradient inside ``window`` (else that window is skipped for this target)."""
        return bool(self.channels) and bool(self.values[(b, slice(None), *window)].ne(0).any())

    def window(self, b: int, window: tuple[slice, ...], device: torch.device) -> torch.Tensor:
        """``[len(channels), *roi]`` values of sample ``b`` inside ``window``."""
        return self.values[(b, slice(None), *window)].to(device)


def _target_gradients(cam: BaseSegCAM, y: torch.Tensor, a: torch.Tensor, ks: list[int], window_gradient):
    """Yield ``(k, dS_k/dy [n, C, *roi], dS_k/dA [n, K, *f])`` for the targets ``ks`` of one window batch.

    Each output gradient is built just before its own backward pass and dropped after it, so only one target's
    window-sized gradient is alive at a time (unless ``cam.batch_targets`` asks for one batched pass).
    """
    if cam.batch_targets and len(ks) > 1:
        gws = [window_gradient(k) for k in ks]
        yield from zip(ks, gws, cam.activation_grads(y, a, gws))
        return
    for j, k in enumerate(ks):
        gw = window_gradient(k)
        (g,) = cam.activation_grads(y, a, [gw], retain_graph=j < len(ks) - 1)
        yield k, gw, g


def _reset(hook, x):
    hook.reset()
    return x


def _activations(cam: BaseSegCAM, hook, x_pad, grid: WindowGrid, batch, sw_device) -> torch.Tensor:
    """Hooked activation ``[n, K, *f]`` (float32) of a batch of windows, stopping the forward at the layer."""
    xw = torch.cat([x_pad[(slice(b, b + 1), slice(None), *grid.slices[i])] for b, i in batch]).to(sw_device)
    hook.reset()
    try:
        with torch.no_grad(), cam.autocast(sw_device):
            run_model(cam.model, xw)
    except StopForward:
        pass
    if hook.activation is None:
        raise MedcamError(f"layer {cam.layer_name!r} never ran in the forward pass")
    return cam.to_feature_map(hook.activation, grid.roi_size)


def _to_feature_grid(weight: torch.Tensor, feat_shape: tuple[int, ...]) -> torch.Tensor:
    """Average a window-grid weight ``[n, 1, *roi]`` down to the feature grid ``[n, 1, *f]`` (area pooling)."""
    if tuple(weight.shape[2:]) == feat_shape:
        return weight
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[weight.ndim - 2]
    return pool(weight, feat_shape)


def _feature_positions(spatial, roi_size, feat_shape) -> float:
    """N: feature-grid positions covering the whole (unpadded) volume, at the layer's stride."""
    return float(math.prod(s * f / r for s, f, r in zip(spatial, feat_shape, roi_size)))


def _add(slot: dict[str, torch.Tensor], st: dict[str, torch.Tensor]) -> None:
    for n, v in st.items():
        slot[n] = slot[n] + v if n in slot else v.detach().clone()
