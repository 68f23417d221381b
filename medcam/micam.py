"""MI-CAM (Iyer, Iyer & Ammal, arXiv 2507.09092) and MI-Grad-CAM for a region of a segmentation output, 2D/3D.

MI-CAM weights each activation channel by its mutual information with the input image and sums the channels; it
needs no gradient. For segmentation (definitions medcam chose, see docs/micam-sycam.md):

* ``U_k`` = channel ``k`` of the hooked activation, upsampled to the input grid (the engine's upsampler).
* Region ``R`` = the target's ROI (``target.roi(output) != 0``) dilated by ``margin`` voxels (a cube), i.e. the ROI's
  neighbourhood; ``margin=None`` uses the whole image.
* ``I_k = (1/Cin) sum_c I(U_k; X_c)`` restricted to ``R``: plug-in MI of a ``bins x bins`` joint histogram
  (:mod:`medcam.mutual_information`), averaged over the input channels (modalities). Bin ranges: min..max of
  ``U_k`` and of ``X_c`` over ``R``.
* MI-CAM: ``alpha_k = I_k / sum_j I_j`` (weights summing to 1); ``map = ReLU(up(sum_k alpha_k A_k))``.
* MI-Grad-CAM: ``alpha_k = NMI_k * (1/N) sum_u g_k(u)`` with ``NMI_k = 2 I_k / (H(U_k) + H(X))`` (averaged over input
  channels) times the Seg-Grad-CAM weight.

Pass plans of several passes (MONAI's sliding window, nnU-Net's folds x tiles x mirrors; :mod:`medcam.plan`): the
weights are those of the whole volume. Pass 1 takes each channel's range over ``R`` pass by pass (min/max reduce
exactly); pass 2 builds the joint histograms pass by pass, each voxel counted with the pass's blend weight
``beta_p`` (mirrored passes flipped back; overlaps, mirrors and folds count once in total); pass 3 blends the maps
``sum_k alpha_k A_pk`` with ``beta_p``, as the pooled methods do (:func:`medcam.executor.blend_pooled_maps`). All
three passes stop the forward at the hooked layer. One window covering the volume gives the whole-image result
exactly; with non-overlapping windows it equals MI-CAM on the stitched activation volume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .engine import BaseSegCAM
from .errors import MedcamError
from .executor import PlanState, blend_pooled_maps, execute, open_state, reference_pass
from .formulas import PooledFormula, Statistics, spatial_sum, weighted_channel_sum
from .mutual_information import JointHistogram, dilate, mutual_information, normalized_mutual_information
from .plan import Pass, PassPlan, flip
from .result import CAMResult
from .targets import Target

__all__ = ["SegMICAM", "SegMIGradCAM", "mi_channel_histograms", "MIWeights", "NMIGradCAM"]

logger = logging.getLogger(__name__)

_CHUNK = 16  # activation channels upsampled at a time (bounds memory on whole volumes)


# ---------------------------------------------------------------------------------------------------- formulas
class MIWeights(PooledFormula):
    """MI-CAM's map ``sum_k alpha_k A_k`` with ``alpha`` = the MI weights, given as the statistic ``"mi"`` ``[B, K]``.

    The weights are not gradient statistics: :class:`SegMICAM` gathers them from joint histograms (its own passes)
    and hands them over as ``{"mi": alpha}``; :meth:`gradient_statistics` is refused.
    """

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        raise MedcamError("MI-CAM's channel weights come from mutual information, not from the gradient: use SegMICAM")

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        return stats["mi"]


class NMIGradCAM(PooledFormula):
    """MI-Grad-CAM: ``alpha_k = NMI_k * (1/N) sum_u g_k(u)`` (Grad-CAM's weights times ``nmi`` ``[1, K]`` or ``[K]``).

    ``nmi=None`` (the class attribute of :class:`SegMIGradCAM`) is Grad-CAM; :meth:`SegMIGradCAM.explain` forms one
    formula per (sample, target) with that pair's NMI weights.
    """

    def __init__(self, nmi: torch.Tensor | None = None):
        self.nmi = nmi

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: Statistics | None = None
    ) -> Statistics:
        return {"grad": spatial_sum(grad)}

    def weights(self, stats: Statistics, n_positions: float, layer: str | None = None) -> torch.Tensor:
        alpha = stats["grad"] / n_positions
        if self.nmi is None:
            return alpha
        return alpha * self.nmi.to(device=alpha.device, dtype=alpha.dtype)


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


def _chunks(k: int) -> Iterator[list[int]]:
    for s in range(0, k, _CHUNK):
        yield list(range(s, min(k, s + _CHUNK)))


def _upsampled_values(
    cam: BaseSegCAM,
    act: torch.Tensor,
    size: Sequence[int],
    region: torch.Tensor,
    channels: list[int],
    mirror: tuple[int, ...] = (),
) -> torch.Tensor:
    """``[k, n]`` values of the upsampled channels ``channels`` of ``act`` ``[K, *f]`` (flipped back over the dims
    ``mirror`` of a ``[B, C, *S]`` tensor) at the ``region`` voxels."""
    up = flip(cam.upsampler(act[channels][None], size), mirror)[0]
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
    """Shared machinery: per-(sample, target) MI statistics, whole image or window by window, on the model runner."""

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module = "auto",
        *,
        bins: int = 32,
        margin: int | None = 8,
        **kwargs: Any,
    ):
        _check_params(bins, margin)
        self.bins, self.margin = bins, margin
        super().__init__(model, layer, **kwargs)

    # -- MI statistics --------------------------------------------------------------------------------------------
    def _weights_from_histogram(self, hist: JointHistogram) -> torch.Tensor:
        raise NotImplementedError

    def _whole_histograms(
        self, image: torch.Tensor, tl: list[Target], act: torch.Tensor, output: torch.Tensor
    ) -> list[list[JointHistogram]]:
        regions = [_region(t, output, self.margin) for t in tl]
        return [
            [mi_channel_histograms(self, act[b], image[b], r[b], self.bins) for r in regions]
            for b in range(image.shape[0])
        ]

    def _plan_histograms(self, st: PlanState, tl: list[Target], reference: torch.Tensor) -> list[list[JointHistogram]]:
        """Pass 1 (ranges) and pass 2 (weighted counts) over the passes whose window meets each region; each
        voxel of a pass counts with the pass's blend weight (mirrored passes flipped back), so that overlaps,
        mirrors and folds count once in total."""
        plan, dev = st.plan, st.plan.net_device
        regions = [plan.pad(_region(t, reference, self.margin).float()) > 0 for t in tl]  # padded
        meets = {
            (b, i): [k for k, r in enumerate(regions) if bool(r[(b, *w)].any())]
            for b in range(plan.batch)
            for i, w in enumerate(plan.windows)
        }
        todo = plan.passes({key for key, ks in meets.items() if ks})
        plan.count_for(len({p[2] for p in todo}))
        lo: dict[tuple[int, int], torch.Tensor] = {}
        hi: dict[tuple[int, int], torch.Tensor] = {}
        with st.hook.mode_as("stop"):
            for p, aw, k, r in self._region_passes(st, todo, meets, regions, "MI-CAM ranges"):  # min/max are exact
                v = torch.cat([_upsampled_values(self, aw, plan.roi_size, r, ch, p[3]) for ch in _chunks(aw.shape[0])])
                if v.shape[1]:
                    mn, mx = v.min(1).values, v.max(1).values
                    lo[(p[0], k)] = torch.minimum(lo[(p[0], k)], mn) if (p[0], k) in lo else mn
                    hi[(p[0], k)] = torch.maximum(hi[(p[0], k)], mx) if (p[0], k) in hi else mx
            volume = plan.image[(slice(None), slice(None), *plan.crop)]
            hists: dict[tuple[int, int], JointHistogram] = {}
            for (b, k), mn in lo.items():
                img_range = _img_range(volume[b].to(dev), _region(tl[k], reference, self.margin)[b].to(dev))
                hists[(b, k)] = JointHistogram((mn, hi[(b, k)]), img_range, self.bins)
            for p, aw, k, r in self._region_passes(st, todo, meets, regions, "MI-CAM histograms"):
                b, _, i, m = p
                if (b, k) not in hists:
                    continue
                x = plan.image[(b, slice(None), *plan.windows[i])].to(dev).flatten(1)[:, r.flatten()]
                w = plan.blend(i, dev).flatten()[r.flatten()]
                for ch in _chunks(aw.shape[0]):
                    hists[(b, k)].add(_upsampled_values(self, aw, plan.roi_size, r, ch, m), x, w, channels=ch)
            n_act = next(iter(hists.values())).counts.shape[1] if hists else None
            if n_act is None:  # every region is empty: one window tells the channel count (the weights are all 0)
                n_act = st.runner.activations(plan.first_window(), st.hook).shape[1]
        return [
            [self._histogram_or_empty(hists, b, k, n_act, volume.shape[1], dev) for k in range(len(tl))]
            for b in range(plan.batch)
        ]

    def _region_passes(
        self,
        st: PlanState,
        todo: list[Pass],
        meets: dict[tuple[int, int], list[int]],
        regions: list[torch.Tensor],
        desc: str,
    ) -> Iterator[tuple[Pass, torch.Tensor, int, torch.Tensor]]:
        """``(pass, its activation [K, *f], target k, k's region in the window [*roi])`` for every pass of
        ``todo`` and every target whose region its window meets (forward to the layer only)."""
        plan = st.plan
        for batch in st.run_batches(todo, desc):
            aw = st.runner.activations(plan.inputs(batch), st.hook)
            for j, p in enumerate(batch):
                for k in meets[(p[0], p[2])]:
                    yield p, aw[j], k, regions[k][(p[0], *plan.windows[p[2]])].to(plan.net_device)

    def _histogram_or_empty(
        self, hists: dict[tuple[int, int], JointHistogram], b: int, k: int, n_act: int, n_in: int, dev: torch.device
    ) -> JointHistogram:
        if (b, k) not in hists:
            z, zi = torch.zeros(n_act, device=dev), torch.zeros(n_in, device=dev)
            hists[(b, k)] = JointHistogram((z, z), (zi, zi), self.bins)
        return hists[(b, k)]

    def channel_weights(self, image: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """MI weights ``[B, K_targets, K_channels]`` (float64) as used for the map (whole image or sliding)."""
        image, tl = self._prepare(image, targets)
        return self._weights(self._run(self._plan_of(image), tl, None, maps=False).hists)

    def _plan_of(self, image: torch.Tensor) -> PassPlan:
        from .plan import whole_plan
        from .sliding import monai_plan

        return whole_plan(image) if self.inferer is None else monai_plan(self.inferer, image)

    def _weights(self, hists: list[list[JointHistogram]]) -> torch.Tensor:
        return torch.stack([torch.stack([self._weights_from_histogram(h) for h in row]) for row in hists])

    def _run(self, plan: PassPlan, tl: list[Target], output: torch.Tensor | None, *, maps: bool) -> _MIRun:
        """The histograms of every (sample, target) and the reference output; with ``maps``, also the maps
        ``sum_k alpha_k A_k`` blended over the plan's passes (the whole image: its one activation)."""
        runner = self.runner
        if plan.single_pass:
            image = plan.image
            with runner.session("detach") as hook:
                hook.reset()
                with torch.no_grad():
                    out = runner.predictor(image)
                act = runner.to_feature_map(runner._captured(hook), image.shape[2:])
            y = out.detach().float()
            return _MIRun(self._whole_histograms(image, tl, act, y), y, act=act)
        with runner.session("detach") as hook, plan.fold_weights(runner.model) as load_fold:
            st = open_state(runner, self.formula, len(tl), plan, hook, upsampler=self.upsampler, progress=self.progress)
            st.load_fold = load_fold
            reference = reference_pass(st, tl, output)  # the caller's output, a prediction or a stand-in
            run = _MIRun(self._plan_histograms(st, tl, reference), reference, stats=st.stats)
            if maps:
                alphas = self._weights(run.hists)
                alpha = {(b, k): alphas[b, k].float() for b in range(plan.batch) for k in range(len(tl))}
                blend_pooled_maps(st, alpha)
                run.maps, run.feat = st.stitched(), st.feat_shape
        return run


@dataclass
class _MIRun:
    """What the MI passes give: histograms ``[B][T]``, the reference output (a stand-in when nothing needed the
    prediction), the whole image's activation, or the blended maps ``[B, T, *S]`` and the passes' statistics."""

    hists: list[list[JointHistogram]]
    reference: torch.Tensor
    act: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    feat: tuple[int, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)


def _prediction_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """How the MI passes got the prediction (and why not in one pass with the gradients), for ``CAMResult.stats``."""
    return {k: stats[k] for k in ("prediction", "one_pass") if k in stats}


def _real_output(reference: torch.Tensor) -> torch.Tensor | None:
    """The model output the reference pass computed, or None for its zero-stride stand-in (no prediction needed)."""
    return reference if reference.stride()[0] != 0 or reference.numel() == 1 else None


class SegMICAM(_MIBase):
    """MI-CAM for a region of a segmentation output (gradient-free; see the module docstring for the definition).

    Args:
        model, layer, inferer, amp, upsampler, output_index, progress, reshape_transform: as :class:`BaseSegCAM`
            (``score``/``output_activation`` are accepted for a uniform interface; MI-CAM forms no score gradient).
        bins: equal-width bins per axis of the joint histograms (default 32).
        margin: the region is the target's ROI dilated by this many voxels on the input grid (default 8);
            None uses the whole image.
    """

    #: the map is pooled (``sum_k alpha_k A_k``) with the MI weights; :meth:`explain` gathers them (no gradient)
    formula = MIWeights()

    def _weights_from_histogram(self, hist: JointHistogram) -> torch.Tensor:
        mi = mutual_information(hist.counts).mean(0)  # [K], mean over input channels
        total = mi.sum()
        return mi / total if float(total) > 0 else torch.zeros_like(mi)

    def _execute(
        self, plan: PassPlan, tl: list[Target], *, relu: bool, upsample: bool, output: torch.Tensor | None
    ) -> CAMResult:
        """MI weights from the histogram passes, then the map. :meth:`~BaseSegCAM.explain`'s result: maps
        ``[B, T, *S]``; ``scores`` are the ROI scores of the model output (logits) where it was computed, else 0;
        ``stats["mi_weights"]`` holds ``alpha`` ``[B, T, K]``."""
        run = self._run(plan, tl, output, maps=True)
        ref = run.reference
        alphas = self._weights(run.hists)  # [B, T, K]
        for t in tl:
            if not bool((t.roi(ref) != 0).any()):
                logger.warning("target %r has an empty ROI: its map is all zero", t)
        stats: dict[str, Any] = {**run.stats, "mi_weights": alphas.float().cpu()}
        if run.act is not None:
            weights = [self.formula.weights({"mi": alphas[:, k].float()}, 1.0) for k in range(len(tl))]
            maps = torch.stack([weighted_channel_sum(w, run.act) for w in weights], 1)
            feat = tuple(run.act.shape[2:])
            if upsample:
                maps = self.upsampler(maps, plan.image.shape[2:])
        else:
            assert run.maps is not None
            maps, feat = run.maps, run.feat
        if relu:
            maps = torch.relu(maps)
        scores = torch.stack([(t.score_weights(ref) * ref).flatten(1).sum(1) for t in tl], 1).float().cpu()
        voxels = torch.stack([(t.roi(ref) != 0).flatten(1).sum(1) for t in tl], 1).cpu()
        return CAMResult(
            maps=maps.float().contiguous(),
            scores=scores,
            roi_voxels=voxels,
            targets=tl,
            layer=str(self.layer_name),
            feature_shape=feat,
            output=_real_output(ref),
            stats=stats,
        )


class SegMIGradCAM(_MIBase):
    """MI-Grad-CAM: Seg-Grad-CAM weights times each channel's normalised MI with the input (documented choice).

    ``alpha_k = NMI_k * (1/N) sum_u g_k(u)``, ``NMI_k = 2 I(U_k; X) / (H(U_k) + H(X))`` over the ROI neighbourhood
    (mean over input channels). The gradient part is Seg-Grad-CAM's, with its exact sliding-window statistics (the
    executor, :func:`medcam.executor.execute`, with a :class:`NMIGradCAM` formula, on any pass plan); the NMI part
    is gathered pass by pass as for :class:`SegMICAM`. Each (sample, target) is explained in its own executor call,
    with its own formula.
    """

    #: without NMI weights this is Grad-CAM; :meth:`explain` forms one formula per (sample, target)
    formula = NMIGradCAM()

    def _weights_from_histogram(self, hist: JointHistogram) -> torch.Tensor:
        return normalized_mutual_information(hist.counts).mean(0)

    def _execute(
        self, plan: PassPlan, tl: list[Target], *, relu: bool, upsample: bool, output: torch.Tensor | None
    ) -> CAMResult:
        """NMI weights from the histogram passes, then one executor call per (sample, target) with its formula."""
        run = self._run(plan, tl, output, maps=False)
        nmi = self._weights(run.hists)  # [B, T, K]
        given = output if output is not None else _real_output(run.reference)  # spares each call its prediction
        results: list[list[CAMResult]] = []
        for b in range(plan.batch):
            row = []
            for k, t in enumerate(tl):
                res = execute(
                    self.runner,
                    NMIGradCAM(nmi[b, k][None]),
                    plan.sample(b),
                    [t],
                    upsampler=self.upsampler,
                    relu=relu,
                    upsample=upsample,
                    progress=self.progress,
                    output=None if given is None or plan.single_pass else given[b : b + 1],
                    graph_budget=self.graph_budget,
                )
                row.append(res)
            results.append(row)
        first = results[0][0]
        maps = torch.cat([torch.cat([r.maps for r in row], 1) for row in results], 0)
        scores = torch.cat([torch.cat([r.scores for r in row], 1) for row in results], 0)
        voxels = torch.cat([torch.cat([r.roi_voxels for r in row], 1) for row in results], 0)
        outputs = [row[0].output for row in results]
        return CAMResult(
            maps=maps,
            scores=scores,
            roi_voxels=voxels,
            targets=tl,
            layer=first.layer,
            feature_shape=first.feature_shape,
            output=None if any(o is None for o in outputs) else torch.cat([o for o in outputs if o is not None], 0),
            stats={**first.stats, **_prediction_stats(run.stats), "nmi_weights": nmi.float().cpu()},
        )
