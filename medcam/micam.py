"""MI-CAM (Iyer, Iyer & Ammal, arXiv 2507.09092) and MI-Grad-CAM for a region of a segmentation output, 2D/3D.

MI-CAM weights each activation channel by its mutual information with the input image and sums the channels; it
needs no gradient. For segmentation (definitions medcam chose, see the README section "MI-CAM"):

* ``U_k`` = channel ``k`` of the hooked activation, upsampled to the input grid (the engine's upsampler).
* Region ``R`` = the target's ROI (``target.roi(output) != 0``) dilated by ``margin`` voxels (a cube), i.e. the ROI's
  neighbourhood; ``margin=None`` uses the whole image.
* ``I_k = (1/Cin) sum_c I(U_k; X_c)`` restricted to ``R``: plug-in MI of a ``bins x bins`` joint histogram
  (:mod:`medcam.mutual_information`), averaged over the input channels (modalities). Bin ranges: min..max of
  ``U_k`` and of ``X_c`` over ``R``.
* MI-CAM: ``alpha_k = I_k / sum_j I_j`` (weights summing to 1); ``map = ReLU(up(sum_k alpha_k A_k))``.
* MI-Grad-CAM: ``alpha_k = NMI_k * (1/N) sum_u g_k(u)`` with ``NMI_k = 2 I_k / (H(U_k) + H(X))`` (averaged over input
  channels) times the Seg-Grad-CAM weight.

Sliding windows (``inferer=``): the weights are those of the whole volume. Pass 1 takes each channel's range over
``R`` window by window (min/max reduce exactly); pass 2 builds the joint histograms window by window, each voxel
counted with its normalised blending weight (overlaps count once in total); pass 3 blends the maps
``sum_k alpha_k A_wk`` with the blending weights, as the pooled methods do. All three passes stop the forward at the
hooked layer. One window covering the volume gives the whole-image result exactly; with non-overlapping windows it
equals MI-CAM on the stitched activation volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .engine import BaseSegCAM, CAMResult, run_model, weighted_channel_sum
from .errors import MedcamError
from .mutual_information import JointHistogram, dilate, mutual_information, normalized_mutual_information
from .targets import Target

__all__ = ["SegMICAM", "SegMIGradCAM", "mi_channel_histograms"]

logger = logging.getLogger(__name__)

_CHUNK = 16  # activation channels upsampled at a time (bounds memory on whole volumes)


def _check_params(bins: int, margin: int | None) -> None:
    if not isinstance(bins, int) or bins < 2:
        raise MedcamError(f"bins must be an int >= 2, got {bins!r}")
    if margin is not None and (not isinstance(margin, int) or margin < 0):
        raise MedcamError(f"margin must be None (whole image) or an int >= 0 (voxels), got {margin!r}")


def _region(t: Target, reference: torch.Tensor, margin: int | None) -> torch.Tensor:
    """Bool ``[B, *S]``: the ROI of ``t`` dilated by ``margin`` voxels (all True for ``margin=None``)."""
    roi = t.roi(reference) != 0
    if margin is None:
        return torch.ones_like(roi)
    return dilate(roi, margin)


def _img_range(image: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel min / max of ``image`` ``[Cin, *S]`` over ``region`` ``[*S]``."""
    vals = image.flatten(1)[:, region.flatten()]
    if vals.shape[1] == 0:
        z = torch.zeros(image.shape[0], device=image.device)
        return z, z
    return vals.min(1).values, vals.max(1).values


def _chunks(k: int):
    for s in range(0, k, _CHUNK):
        yield list(range(s, min(k, s + _CHUNK)))


def _upsampled_values(cam: BaseSegCAM, act: torch.Tensor, size, region: torch.Tensor, channels) -> torch.Tensor:
    """``[k, n]`` values of the upsampled channels ``channels`` of ``act`` ``[K, *f]`` at the ``region`` voxels."""
    up = cam.upsampler(act[channels][None], size)[0]
    return up.flatten(1)[:, region.flatten()]


def mi_channel_histograms(
    cam: BaseSegCAM, act: torch.Tensor, image: torch.Tensor, region: torch.Tensor, bins: int
) -> JointHistogram:
    """Whole-image joint histograms of one sample: ``act`` ``[K, *f]``, ``image`` ``[Cin, *S]``, ``region`` ``[*S]``."""
    size = tuple(image.shape[1:])
    k = act.shape[0]
    lo = torch.empty(k, device=act.device)
    hi = torch.empty(k, device=act.device)
    for ch in _chunks(k):
        v = _upsampled_values(cam, act, size, region, ch)
        if v.shape[1]:
            lo[ch], hi[ch] = v.min(1).values, v.max(1).values
        else:
            lo[ch], hi[ch] = 0.0, 0.0
    hist = JointHistogram((lo, hi), _img_range(image, region), bins)
    x = image.flatten(1)[:, region.flatten()]
    for ch in _chunks(k):
        hist.add(_upsampled_values(cam, act, size, region, ch), x, channels=ch)
    return hist


class _MIBase(BaseSegCAM):
    """Shared machinery: per-(sample, target) MI statistics, whole image or window by window."""

    elementwise = False

    def __init__(self, model, layer="auto", *, bins: int = 32, margin: int | None = 8, **kwargs: Any):
        _check_params(bins, margin)
        self.bins, self.margin = bins, margin
        super().__init__(model, layer, **kwargs)

    # -- MI statistics --------------------------------------------------------------------------------------------
    def _weights_from_histogram(self, hist: JointHistogram) -> torch.Tensor:
        raise NotImplementedError

    def _whole_histograms(self, image, tl, act, output) -> list[list[JointHistogram]]:
        regions = [_region(t, output, self.margin) for t in tl]
        return [
            [mi_channel_histograms(self, act[b], image[b], r[b], self.bins) for r in regions]
            for b in range(image.shape[0])
        ]

    def _sliding_histograms(self, image, tl, hook, grid, x_pad, sw_device, reference) -> list[list[JointHistogram]]:
        """Pass 1 (ranges) and pass 2 (weighted counts) over the windows that meet each region."""
        from .sliding import _activations

        bsz = image.shape[0]
        regions = [grid.pad_zeros(_region(t, reference, self.margin).float()) > 0 for t in tl]  # padded
        pairs = [(b, i) for b in range(bsz) for i in range(len(grid.slices))]
        meets = {(b, i): [k for k, r in enumerate(regions) if bool(r[(b, *grid.slices[i])].any())] for b, i in pairs}
        todo = [p for p in pairs if meets[p]]
        lo: dict[tuple[int, int], torch.Tensor] = {}
        hi: dict[tuple[int, int], torch.Tensor] = {}
        hook.mode = "stop"
        show = not (self.progress or self.inferer.progress)
        for b, i in tqdm(todo, desc="MI-CAM ranges", disable=show):  # pass 1: ranges over R (min/max reduce exactly)
            aw = _activations(self, hook, x_pad, grid, [(b, i)], sw_device)[0]
            for k in meets[(b, i)]:
                r = regions[k][(b, *grid.slices[i])].to(sw_device)
                v = torch.cat([_upsampled_values(self, aw, grid.roi_size, r, ch) for ch in _chunks(aw.shape[0])])
                if v.shape[1]:
                    mn, mx = v.min(1).values, v.max(1).values
                    lo[(b, k)] = torch.minimum(lo[(b, k)], mn) if (b, k) in lo else mn
                    hi[(b, k)] = torch.maximum(hi[(b, k)], mx) if (b, k) in hi else mx
        hists: dict[tuple[int, int], JointHistogram] = {}
        for (b, k), mn in lo.items():
            img_range = _img_range(image[b].to(sw_device), _region(tl[k], reference, self.margin)[b].to(sw_device))
            hists[(b, k)] = JointHistogram((mn, hi[(b, k)]), img_range, self.bins)
        for b, i in tqdm(todo, desc="MI-CAM histograms", disable=show):  # pass 2: counts weighted by blending
            aw = _activations(self, hook, x_pad, grid, [(b, i)], sw_device)[0]
            xw = x_pad[(b, slice(None), *grid.slices[i])].to(sw_device)
            bw = grid.blend_weight(i, sw_device)
            for k in meets[(b, i)]:
                r = regions[k][(b, *grid.slices[i])].to(sw_device)
                if (b, k) not in hists:
                    continue
                x = xw.flatten(1)[:, r.flatten()]
                w = bw.flatten()[r.flatten()]
                for ch in _chunks(aw.shape[0]):
                    hists[(b, k)].add(_upsampled_values(self, aw, grid.roi_size, r, ch), x, w, channels=ch)
        n_act = next(iter(hists.values())).counts.shape[1] if hists else None
        if n_act is None:  # every region is empty: one window tells the channel count (the weights are all 0)
            n_act = _activations(self, hook, x_pad, grid, [(0, 0)], sw_device).shape[1]
        hook.mode = "grad"
        out: list[list[JointHistogram]] = []
        for b in range(bsz):
            row = []
            for k in range(len(tl)):
                if (b, k) not in hists:
                    z = torch.zeros(n_act, device=sw_device)
                    zi = torch.zeros(image.shape[1], device=sw_device)
                    hists[(b, k)] = JointHistogram((z, z), (zi, zi), self.bins)
                row.append(hists[(b, k)])
            out.append(row)
        return out

    def channel_weights(self, image: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """MI weights ``[B, K_targets, K_channels]`` (float64) as used for the map (whole image or sliding)."""
        from .engine import validate_image
        from .targets import as_target_list

        tl = as_target_list(targets)
        image = validate_image(image)
        self._ensure_layer(image)
        hists = self._histograms(image, tl)[0]
        return torch.stack([torch.stack([self._weights_from_histogram(h) for h in row]) for row in hists])

    def _histograms(self, image, tl, output=None):
        """``(histograms [B][T], output or None, extra)`` for whole image or window by window."""
        if self.inferer is None:
            with self.hooked("detach") as hook:
                hook.reset()
                with torch.no_grad(), self.autocast(image.device):
                    out = self.select_output(run_model(self.model, image))
                act = self.to_feature_map(hook.activation, image.shape[2:])
            y = out.detach().float()
            return self._whole_histograms(image, tl, act, y), y, act
        return self._sliding(image, tl, maps=False, output=output)

    def _sliding(self, image, tl, maps: bool, alphas=None, output=None):
        from .sliding import WindowGrid, _activations, stitch_device

        inf = self.inferer
        sw_device = torch.device(inf.sw_device) if inf.sw_device is not None else image.device
        spatial = tuple(image.shape[2:])
        device = stitch_device(inf, image)
        grid = WindowGrid(inf, spatial, sw_device, device)
        x_pad = grid.pad_tensor(image, inf.padding_mode, inf.cval)
        with self.hooked("detach") as hook:
            if not maps:
                if output is not None:  # the caller's blended output (spares the prediction pass)
                    output = output.as_tensor() if hasattr(output, "as_tensor") else output
                    if output.shape[0] != image.shape[0] or tuple(output.shape[2:]) != spatial:
                        raise MedcamError(
                            f"output has shape {tuple(output.shape)} but the image is {tuple(image.shape)}: pass the "
                            "blended output of sliding_window_inference on this image"
                        )
                    reference = output.detach().float().to(device)
                else:
                    reference = self._reference_output(image, hook, grid, sw_device, device)
                hists = self._sliding_histograms(image, tl, hook, grid, x_pad, sw_device, reference)
                return hists, reference, None
            acc = torch.zeros((image.shape[0], len(tl), *grid.padded_size), device=device)
            hook.mode = "stop"
            feat: tuple[int, ...] = ()
            show = not (self.progress or self.inferer.progress)
            for b in range(image.shape[0]):
                for i, s in enumerate(tqdm(grid.slices, desc="MI-CAM maps", disable=show)):
                    aw = _activations(self, hook, x_pad, grid, [(b, i)], sw_device)
                    feat = tuple(aw.shape[2:])
                    m = weighted_channel_sum(alphas[b].to(sw_device).float(), aw.expand(len(tl), *aw.shape[1:]))
                    m = self.upsampler(m[None], grid.roi_size)[0] * grid.blend_weight(i, sw_device)
                    acc[(b, slice(None), *s)] += m.to(device)
            return acc[(slice(None), slice(None), *grid.crop)], feat, len(grid.slices) * image.shape[0]

    def _reference_output(self, image, hook, grid, sw_device, device) -> torch.Tensor:
        """The blended output when a target needs the prediction, else a zero-stride stand-in of the right shape."""
        from monai.inferers import sliding_window_inference

        from .sliding import _reset

        inf = self.inferer
        hook.mode = "detach"
        needs = getattr(self, "_needs_prediction", False)
        with torch.no_grad(), self.autocast(sw_device):
            if needs:
                out = sliding_window_inference(
                    image,
                    grid.roi_size,
                    inf.sw_batch_size,
                    lambda x: self.select_output(run_model(self.model, _reset(hook, x))),
                    overlap=inf.overlap,
                    mode=inf.mode,
                    sigma_scale=inf.sigma_scale,
                    padding_mode=inf.padding_mode,
                    cval=inf.cval,
                    sw_device=sw_device,
                    device=device,
                )
                out = out.as_tensor() if hasattr(out, "as_tensor") else out
                return out.float()
            first = grid.pad_tensor(image[:1], inf.padding_mode, inf.cval)[(slice(None), slice(None), *grid.slices[0])]
            n_out = self.select_output(run_model(self.model, _reset(hook, first.to(sw_device)))).shape[1]
        return torch.zeros((), device=device).expand(image.shape[0], n_out, *image.shape[2:])


class SegMICAM(_MIBase):
    """MI-CAM for a region of a segmentation output (gradient-free; see the module docstring for the definition).

    Args:
        model, layer, inferer, amp, upsampler, output_index, progress, reshape_transform: as :class:`BaseSegCAM`
            (``score``/``output_activation`` are accepted for a uniform interface; MI-CAM forms no score gradient).
        bins: equal-width bins per axis of the joint histograms (default 32).
        margin: the region is the target's ROI dilated by this many voxels on the input grid (default 8);
            None uses the whole image.
    """

    def _weights_from_histogram(self, hist: JointHistogram) -> torch.Tensor:
        mi = mutual_information(hist.counts).mean(0)  # [K], mean over input channels
        total = mi.sum()
        return mi / total if float(total) > 0 else torch.zeros_like(mi)

    def explain(self, image, targets, *, relu: bool = True, upsample: bool = True, output=None) -> CAMResult:
        """Maps ``[B, T, *S]`` (see :meth:`BaseSegCAM.explain`); ``scores`` are the ROI scores of the model output
        (logits) where it was computed, else 0; ``stats["mi_weights"]`` holds ``alpha`` ``[B, T, K]``."""
        from .engine import validate_image
        from .targets import as_target_list

        tl = as_target_list(targets)
        image = validate_image(image)
        self._ensure_layer(image)
        if self.inferer is not None and not upsample:
            raise MedcamError(
                "upsample=False is not available with an inferer: window maps are stitched on the input grid"
            )
        self._needs_prediction = any(t.needs_prediction for t in tl)
        if output is not None and self.inferer is None:
            raise MedcamError("output= is for the sliding-window mode; without an inferer the forward pass gives it")
        hists, reference, act = self._histograms(image, tl, output)
        alphas = torch.stack([torch.stack([self._weights_from_histogram(h) for h in row]) for row in hists])  # [B,T,K]
        for t in tl:
            if not bool((t.roi(reference) != 0).any()):
                logger.warning("target %r has an empty ROI: its map is all zero", t)
        stats: dict[str, Any] = {"mi_weights": alphas.float().cpu()}
        if self.inferer is None:
            maps = torch.stack([weighted_channel_sum(alphas[:, k].float(), act) for k in range(len(tl))], 1)
            feat = tuple(act.shape[2:])
            if upsample:
                maps = self.upsampler(maps, image.shape[2:])
        else:
            maps, feat, n_win = self._sliding(image, tl, maps=True, alphas=alphas)
            stats["windows"] = n_win
        if relu:
            maps = torch.relu(maps)
        ref = reference
        scores = torch.stack([(t.score_weights(ref) * ref).flatten(1).sum(1) for t in tl], 1).float().cpu()
        voxels = torch.stack([(t.roi(ref) != 0).flatten(1).sum(1) for t in tl], 1).cpu()
        real_output = ref if ref.stride()[0] != 0 or ref.numel() == 1 else None
        return CAMResult(
            maps=maps.float().contiguous(),
            scores=scores,
            roi_voxels=voxels,
            targets=tl,
            layer=str(self.layer_name),
            feature_shape=feat,
            output=real_output,
            stats=stats,
        )


class SegMIGradCAM(_MIBase):
    """MI-Grad-CAM: Seg-Grad-CAM weights times each channel's normalised MI with the input (documented choice).

    ``alpha_k = NMI_k * (1/N) sum_u g_k(u)``, ``NMI_k = 2 I(U_k; X) / (H(U_k) + H(X))`` over the ROI neighbourhood
    (mean over input channels). The gradient part is Seg-Grad-CAM's, with its exact sliding-window statistics; the
    NMI part is gathered window by window as for :class:`SegMICAM`. Each (sample, target) is explained in its own
    call of the engine.
    """

    def _weights_from_histogram(self, hist: JointHistogram) -> torch.Tensor:
        return normalized_mutual_information(hist.counts).mean(0)

    def gradient_statistics(self, activation, grad, activation_stats=None):
        return {"grad": grad.flatten(2).sum(-1)}

    def weights_from_statistics(self, stats, n_positions):
        nmi = self._nmi.to(stats["grad"].device).to(stats["grad"].dtype)
        return stats["grad"] / n_positions * nmi

    def explain(self, image, targets, *, relu: bool = True, upsample: bool = True, output=None) -> CAMResult:
        from .engine import validate_image
        from .targets import as_target_list

        tl = as_target_list(targets)
        image = validate_image(image)
        self._ensure_layer(image)
        self._needs_prediction = any(t.needs_prediction for t in tl)
        hists = self._histograms(image, tl, output if self.inferer is not None else None)[0]
        nmi = torch.stack([torch.stack([self._weights_from_histogram(h) for h in row]) for row in hists])  # [B,T,K]
        results = []
        for b in range(image.shape[0]):
            row = []
            for k, t in enumerate(tl):
                self._nmi = nmi[b, k][None]
                out_b = None if output is None else output[b : b + 1]
                row.append(super().explain(image[b : b + 1], [t], relu=relu, upsample=upsample, output=out_b))
            results.append(row)
        del self._nmi
        first = results[0][0]
        maps = torch.cat([torch.cat([r.maps for r in row], 1) for row in results], 0)
        scores = torch.cat([torch.cat([r.scores for r in row], 1) for row in results], 0)
        voxels = torch.cat([torch.cat([r.roi_voxels for r in row], 1) for row in results], 0)
        return CAMResult(
            maps=maps,
            scores=scores,
            roi_voxels=voxels,
            targets=tl,
            layer=first.layer,
            feature_shape=first.feature_shape,
            output=None if first.output is None else torch.cat([row[0].output for row in results], 0),
            stats={**first.stats, "nmi_weights": nmi.float().cpu()},
        )
