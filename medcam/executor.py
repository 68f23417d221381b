"""The executor: explain the prediction of any :class:`~medcam.plan.PassPlan`, exactly, pass by pass.

Definition (what is explained). The plan's prediction is ``Y(u) = sum_p beta_p(u) flip_m(y_p)(u)`` over its passes
``p = (b, f, i, m)`` (:mod:`medcam.plan`), and the ROI score is ``S = sum_u W(u) Y(u)`` (``W`` = score weights of the
target on ``Y``; for probability scores ``W`` is ``dS/dY`` at ``Y``). Hence the output gradient of one pass is

    dS/dy_p = flip_m(W beta_p)                                                          (1)

and each pass is differentiated on its own with (1): no graph spans two passes, so memory is that of one network
call (``batch_size`` passes) whatever the volume size, number of folds or mirrors.

* Element-wise formulas (:class:`~medcam.formulas.ElementwiseFormula`: HiResCAM, LayerCAM, element-wise SyCAM
  expressions): each pass's pre-ReLU map (from its gradient, which carries ``beta_p``) is upsampled to the window,
  flipped back and summed into volume coordinates.
* Pooled formulas (:class:`~medcam.formulas.PooledFormula`: Grad-CAM, XGrad-CAM, Grad-CAM++, MI-Grad-CAM, pooled
  SyCAM expressions): the statistics are sums over all passes (a flip does not change a sum); ``N`` = feature-grid
  positions covering the volume; activation sums weight each pass's feature positions by ``flip_m(beta_p)``
  area-averaged onto the feature grid, so that overlaps, mirrors and folds count once. The channel weights are
  global, and each pass's ``sum_k alpha_k A_pk`` is upsampled, flipped back and blended with ``beta_p``, like ``Y``.
* ReLU once, on the stitched map. A plan with one pass per sample (:class:`~medcam.plan.WholeImagePlan`) is one
  batched forward pass and one backward pass per target (:func:`explain_single_pass`); every plan whose one
  window covers the volume gives exactly that result.

Passes (one function each, sharing one :class:`PlanState`): (0) :func:`reference_pass`: ``Y`` when a target or the
score needs it (the caller's ``output``, else the plan's ``predict``), or a fused :class:`~medcam.plan.Accumulation`
filled by pass 1, or a stand-in; (A) :func:`activation_statistics_pass` (activation-pooled formulas); (1)
:func:`gradient_pass`: forward + one backward per target of the passes whose window touches an ROI (every pass, the
others forward only, when ``Y`` is fused); (2) :func:`map_pass` / :func:`blend_pooled_maps` (pooled formulas; also
MI-CAM's map): activations from the plan's cache or a forward to the layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import MedcamError
from .formulas import ActivationPooledFormula, ElementwiseFormula, Formula, PooledFormula, Statistics
from .formulas import weighted_channel_sum as _weighted_channel_sum
from .hooks import ActivationHook
from .kept_graphs import Graph, GraphStore, check_graph_budget, framework_prediction
from .plan import Accumulation, Pass, PassPlan, flip
from .result import CAMResult, Upsampler, interpolate_upsampler
from .runner import ModelRunner
from .targets import Target, span

__all__ = [
    "execute",
    "explain_single_pass",
    "check_formula",
    "ChannelSparse",
    "PlanState",
    "open_state",
    "reference_pass",
    "blend_pooled_maps",
    "stand_in",
]

logger = logging.getLogger(__name__)


def check_formula(formula: Formula) -> None:
    """Refuse a formula the executor cannot run exactly, before any pass."""
    if not isinstance(formula, (ElementwiseFormula, PooledFormula)):
        raise MedcamError(f"the executor needs an element-wise or pooled formula, got {formula!r}")


class ChannelSparse:
    """One target's output gradient ``dS/dY`` on the padded grid, stored on its non-zero channels and their bounding
    box only.

    A class, mask or box target puts weight on one output channel; holding all ``C`` channels of a whole volume
    for each target would cost ``C`` times the memory, and a small ROI of a large volume costs its box, not the
    volume (issue 30). Probability scores may touch every channel and are held whole.

    Attributes:
        channels: indices of the channels with a non-zero value (sorted).
        values: ``[B, len(channels), *box]`` gradient on those channels inside the box (the plan's weight dtype).
        lo: the box's first voxel on the padded grid (per spatial dim); zero outside the box.
    """

    def __init__(self, channels: list[int], values: torch.Tensor, lo: tuple[int, ...] | None = None):
        self.channels, self.values = channels, values
        self.lo = lo if lo is not None else (0,) * (values.ndim - 2)

    @classmethod
    def from_dense(cls, grad: torch.Tensor, plan: PassPlan) -> ChannelSparse:
        """From a dense ``[B, C, *S]`` gradient on the unpadded grid (kept on its non-zero channels and box)."""
        nonzero = grad.flatten(2).ne(0).any(dim=2).any(dim=0)  # [C]
        channels = [int(c) for c in torch.nonzero(nonzero).flatten().tolist()]
        if not channels:
            return cls(channels, grad[:, :0].to(dtype=plan.weight_dtype))
        nz = grad[:, channels].ne(0).flatten(0, 1).any(dim=0)  # [*S]
        box = tuple(span(nz.movedim(d, 0).flatten(1).any(dim=1)) for d in range(nz.ndim))
        return cls.from_box(channels, box, grad[_ix(slice(None), channels, *box)], plan)

    @classmethod
    def from_box(
        cls, channels: list[int], box: tuple[slice, ...], values: torch.Tensor, plan: PassPlan
    ) -> ChannelSparse:
        """From ``values`` ``[B, len(channels), *box]`` inside ``box`` (slices of the unpadded grid)."""
        lo = tuple(int(s.start) + int(c.start or 0) for s, c in zip(box, plan.crop))  # onto the padded grid
        return cls(channels, values.to(device=plan.device, dtype=plan.weight_dtype).contiguous(), lo)

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
        size = tuple(w.stop - w.start for w in window)
        out = torch.zeros((len(self.channels), *size), dtype=self.values.dtype, device=device)
        where = self._overlap(window)
        if where is not None:
            out[_ix(slice(None), *where[1])] = self.values[_ix(b, slice(None), *where[0])].to(device)
        return out


@dataclass
class PlanState:
    """What the passes of one explanation share. Made by :func:`open_state`; :func:`reference_pass` fills
    ``output``/``n_out``/``fused``, :func:`target_gradients` ``grads``/``active``/``scores``/``voxels``, the later
    passes ``acc`` (the stitched maps), ``pooled``, ``act_stats``, ``cache`` and ``feat_shape``."""

    runner: ModelRunner
    formula: Formula
    plan: PassPlan
    hook: ActivationHook
    n_targets: int
    upsampler: Upsampler
    progress: bool
    load_fold: Callable[[int], None] = lambda f: None
    output: torch.Tensor | None = None  # Y [B, C, *S] when known
    fused: Accumulation | None = None  # Y formed in pass 1
    n_out: int = 0
    grads: list[ChannelSparse] = field(default_factory=list)  # dS/dY per target
    active: list[list[list[int]]] = field(default_factory=list)  # [b][i] -> targets with gradient in window i
    scores: list[torch.Tensor] = field(default_factory=list)  # per target [B] float64
    voxels: list[torch.Tensor] = field(default_factory=list)  # per target [B]
    acc: torch.Tensor | None = None  # [B, K, *box] stitched maps, on the box of the windows stitched into
    acc_lo: tuple[int, ...] = ()  # the box's first voxel on the padded grid
    pooled: dict[tuple[int, int], Statistics] = field(default_factory=dict)  # gradient statistics per (b, target)
    act_stats: dict[int, Statistics] = field(default_factory=dict)  # activation statistics of the volume per b
    feat_shape: tuple[int, ...] = ()
    cache: dict[Pass, torch.Tensor] = field(default_factory=dict)  # hooked activations kept for the map pass
    cache_used: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    graph_budget: int | None = None  # bytes of kept graphs in one-pass mode (None: from the free memory)
    graphs: GraphStore | None = None  # the one pass's kept graphs (pass 1 takes them)

    @property
    def roi(self) -> tuple[int, ...]:
        return self.plan.roi_size

    @property
    def net_device(self) -> torch.device:
        return self.plan.net_device

    def bar(self, items: list[Any], desc: str) -> Iterator[Any]:
        return iter(tqdm(items, desc=desc, disable=not self.progress))

    def run_batches(self, passes: list[Pass], desc: str) -> Iterator[list[Pass]]:
        """Batches of ``passes`` with their fold's weights loaded; counts the passes."""
        for batch in self.bar(self.plan.batches(passes), desc):
            self.load_fold(batch[0][1])
            self.stats["passes"] += len(batch)
            yield batch

    def open_acc(self, passes: list[Pass]) -> None:
        """Make the map accumulator cover the windows of ``passes`` (besides what it covers): the box of the windows
        stitched into, so that a small ROI's maps cost windows, not the volume (issue 30)."""
        if not passes:
            return
        spans = [self.plan.windows[i] for i in {p[2] for p in passes}]
        lo = [min(s[d].start for s in spans) for d in range(len(spans[0]))]
        hi = [max(s[d].stop for s in spans) for d in range(len(spans[0]))]
        if self.acc is not None:
            size = self.acc.shape[2:]
            lo = [min(a, b) for a, b in zip(lo, self.acc_lo)]
            hi = [max(a, b + n) for a, b, n in zip(hi, self.acc_lo, size)]
            if tuple(lo) == self.acc_lo and tuple(hi) == tuple(a + n for a, n in zip(self.acc_lo, size)):
                return
        shape = (self.plan.batch, self.n_targets, *(b - a for a, b in zip(lo, hi)))
        acc = torch.zeros(shape, dtype=torch.float32, device=self.plan.device)
        if self.acc is not None:
            acc[_ix(slice(None), slice(None), *_shifted(self.acc_lo, self.acc.shape[2:], lo))] = self.acc
        self.acc, self.acc_lo = acc, tuple(lo)

    def stitch(self, p: Pass, k: int, m: torch.Tensor) -> None:
        """Add pass ``p``'s map ``m`` ``[*roi]`` (volume orientation) into target ``k``'s volume."""
        assert self.acc is not None
        w = self.plan.windows[p[2]]
        where = _shifted([s.start for s in w], [s.stop - s.start for s in w], self.acc_lo)
        self.acc[_ix(p[0], k, *where)] += m.to(self.plan.device)

    def keep(self, p: Pass, act: torch.Tensor) -> None:
        """Keep a pass's activation for the map pass (host memory, up to the plan's ``cache_bytes``)."""
        size = act.numel() * act.element_size()
        if p not in self.cache and self.cache_used + size <= self.plan.cache_bytes:
            self.cache[p] = act.detach().to("cpu", copy=True)
            self.cache_used += size

    def stitched(self) -> torch.Tensor:
        """The stitched maps cropped to the unpadded volume, ``[B, K, *S]`` float32 (zero outside the stitched box);
        the accumulator is released."""
        plan, acc = self.plan, self.acc
        self.acc = None
        crop = [(int(c.start or 0), int(c.start or 0) + n) for c, n in zip(plan.crop, plan.spatial)]
        if acc is not None and tuple(acc.shape[2:]) == plan.padded_size and all(a == 0 for a in self.acc_lo):
            if plan.spatial == plan.padded_size:
                return acc  # the accumulator is the volume: no copy
            return acc[_ix(slice(None), slice(None), *plan.crop)]
        out = torch.zeros((plan.batch, self.n_targets, *plan.spatial), dtype=torch.float32, device=plan.device)
        if acc is None:
            return out
        inter = [(max(c0, a), min(c1, a + n)) for (c0, c1), a, n in zip(crop, self.acc_lo, acc.shape[2:])]
        if all(a < b for a, b in inter):
            dst = tuple(slice(a - c0, b - c0) for (a, b), (c0, _) in zip(inter, crop))
            src = tuple(slice(a - o, b - o) for (a, b), o in zip(inter, self.acc_lo))
            out[_ix(slice(None), slice(None), *dst)] = acc[_ix(slice(None), slice(None), *src)]
        return out


def execute(
    runner: ModelRunner,
    formula: Formula,
    plan: PassPlan,
    targets: list[Target],
    *,
    upsampler: Upsampler = interpolate_upsampler,
    relu: bool = True,
    upsample: bool = True,
    progress: bool = False,
    output: torch.Tensor | None = None,
    graph_budget: int | None = None,
) -> CAMResult:
    """Explain the plan's prediction for ``targets`` (module docstring); ``runner``'s layer must be resolved.

    ``output``: ``Y`` ``[B, C, *S]`` if the caller has it (skips the prediction). ``graph_budget``: bytes of graphs
    kept when ``Y`` is formed in the same pass as the explanation (:mod:`medcam.kept_graphs`; None: half the free
    memory; 0: none kept, every pass recomputed). Returns maps ``[B, K, *S]`` (float32, on the plan's ``device``),
    scores ``[B, K]``, ROI voxels, ``output`` = ``Y`` when known, ``stats``.
    """
    check_graph_budget(graph_budget)
    if plan.single_pass:
        return explain_single_pass(
            runner, formula, targets, plan.image, upsampler=upsampler, relu=relu, upsample=upsample
        )
    check_formula(formula)
    if not upsample:
        raise MedcamError("upsample=False is not available with several passes: maps are stitched on the input grid")
    with runner.session("grad") as hook, plan.fold_weights(runner.model) as load_fold:
        st = open_state(runner, formula, len(targets), plan, hook, upsampler=upsampler, progress=progress)
        st.load_fold, st.graph_budget = load_fold, graph_budget
        reference = reference_pass(st, targets, output, fuse=True)
        target_gradients(st, targets, reference)
        del reference
        if isinstance(formula, ActivationPooledFormula) and st.stats["backward_windows"] and not st.act_stats:
            activation_statistics_pass(st)
        gradient_pass(st)
        if isinstance(formula, PooledFormula) and st.pooled:
            map_pass(st)
    if st.fused is not None:
        st.output = st.fused.result()
        st.scores = [runner.output_gradient(st.output, t.score_weights(st.output))[1].double().cpu() for t in targets]
    maps = st.stitched()
    if relu:
        maps = maps.relu_()
    return CAMResult(
        maps=maps.contiguous(),
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
    formula: Formula,
    n_targets: int,
    plan: PassPlan,
    hook: ActivationHook,
    *,
    upsampler: Upsampler = interpolate_upsampler,
    progress: bool = False,
) -> PlanState:
    """The shared state of one explanation; the map accumulator ``acc`` is opened by the passes that stitch, on the
    box of their windows (:meth:`PlanState.open_acc`).

    ``hook`` is the runner's open session (:meth:`ModelRunner.session`); every pass switches its mode as it needs.
    """
    stats = {
        **plan.description,
        "windows": len(plan.windows) * plan.batch,
        "mirrors": len(plan.mirrors),
        "folds": plan.n_folds,
        "backward_windows": 0,
        "activation_windows": 0,
        "passes": 0,
    }
    return PlanState(runner, formula, plan, hook, n_targets, upsampler, progress, stats=stats)


def stand_in(st: PlanState) -> torch.Tensor:
    """A zero-stride zero tensor of ``Y``'s shape (for targets and scores that do not need ``Y``'s values)."""
    plan = st.plan
    n_out = plan.n_out
    if n_out is None:
        with st.hook.mode_as("detach"):
            n_out = st.runner.output_channels(plan.first_window(), st.hook)
    return torch.zeros((), device=plan.device).expand(plan.batch, n_out, *plan.spatial)


def reference_pass(
    st: PlanState, targets: list[Target], output: torch.Tensor | None, *, fuse: bool = False
) -> torch.Tensor:
    """Pass 0: the tensor the targets' weights are taken on, ``[B, C, *S]`` on the plan's device.

    The caller's ``output``; else, when the ROI or the score needs ``Y`` (or the plan's result always carries it
    and it cannot be fused), ``Y`` blended from one pass whose graphs pass 1 reuses (``fuse`` and the plan blends
    from its own calls: :func:`one_pass_prediction`), or the plan's ``predict`` (``stats["one_pass"]`` says why);
    else (``fuse`` and the plan fuses, logits score, no amp) a stand-in while the plan's accumulation forms ``Y`` in
    pass 1; else a stand-in.
    """
    plan, runner = st.plan, st.runner
    needs = runner.score == "probability" or any(t.needs_prediction for t in targets)
    can_fuse = fuse and plan.accumulation is not None and not runner.amp and runner.score == "logits"
    if output is not None:
        output = output.as_tensor() if hasattr(output, "as_tensor") else output
        if output.shape[0] != plan.batch or tuple(output.shape[2:]) != plan.spatial:
            raise MedcamError(
                f"output has shape {tuple(output.shape)} but the image is {(plan.batch, *plan.spatial)}: pass the "
                "model's blended output on this image"
            )
        st.output = reference = output.detach().float().to(plan.device)
        st.stats["prediction"] = "given"
    elif (needs or (plan.prediction_always and not can_fuse)) and (why := one_pass_unavailable(st, fuse)) is None:
        st.output = reference = one_pass_prediction(st)
        st.stats["prediction"] = "one_pass"
    elif needs or (plan.prediction_always and not can_fuse):
        st.stats["one_pass"] = why
        if plan.predict is None:
            raise MedcamError("this plan has no prediction; pass output=")
        with st.hook.mode_as("detach"), torch.no_grad():
            y = plan.predict(plan, runner, st.hook, st.progress)
        st.output = reference = y.as_tensor().float() if hasattr(y, "as_tensor") else y.float()
        st.load_fold(-1)  # the prediction may have loaded other weights
        st.stats["prediction"] = "predictor"
    else:
        reference = stand_in(st)
        if can_fuse:
            assert plan.accumulation is not None
            st.fused = plan.accumulation(plan, int(reference.shape[1]))
            st.stats["prediction"] = "fused"
    if tuple(reference.shape[2:]) != plan.spatial:
        raise MedcamError(f"the model output {tuple(reference.shape)} is not on the input grid {plan.spatial}")
    st.n_out = int(reference.shape[1])
    return reference


def target_gradients(st: PlanState, targets: list[Target], reference: torch.Tensor) -> None:
    """Output gradients ``dS/dY`` per target (padded, on their non-zero channels), scores, ROI sizes, and which
    targets have gradient in each window (the others are skipped there)."""
    plan = st.plan
    for t in targets:
        boxed = _boxed_weights(t, reference) if st.output is None else None
        if boxed is not None:  # a logits score of a boxed ROI: its weights are its gradient, held on its box
            box, values = boxed
            st.voxels.append((values != 0).flatten(1).sum(1).cpu())
            st.scores.append(torch.zeros(plan.batch, dtype=torch.float64))  # summed over passes in pass 1
            st.grads.append(ChannelSparse.from_box([t.channel], box, values[:, None], plan))
            continue
        w = t.score_weights(reference)
        st.voxels.append((t.roi(reference) != 0).flatten(1).sum(1).cpu())
        if st.output is not None:
            g, s = st.runner.output_gradient(st.output, w)
            st.scores.append(s.cpu().double())
        else:
            g = w
            st.scores.append(torch.zeros(plan.batch, dtype=torch.float64))  # summed over passes in pass 1
        del w
        sparse = ChannelSparse.from_dense(g, plan)
        del g
        if not sparse.channels:
            logger.warning("target %r has an empty ROI: its map is all zero", t)
        st.grads.append(sparse)
    st.active = [
        [[k for k, g in enumerate(st.grads) if g.touches(b, s)] for s in plan.windows] for b in range(plan.batch)
    ]
    st.stats["backward_windows"] = sum(bool(ks) for row in st.active for ks in row)


def _boxed_weights(t: Target, reference: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor] | None:
    """``t``'s score weights as (box, values ``[B, *box]``) on its channel when it has a boxed form and the
    base class's one-channel weights (``W = M`` on channel ``c``); else None (dense weights)."""
    if type(t).score_weights is not Target.score_weights:
        return None
    boxed = t.boxed_roi(reference)
    if boxed is None or not 0 <= t.channel < reference.shape[1]:
        return None  # score_weights raises the error
    return boxed


def activation_statistics_pass(st: PlanState) -> None:
    """Pass A (:class:`~medcam.formulas.ActivationPooledFormula`): forward to the layer only, every pass, summing
    the blended activation statistics of the volume per sample. First, because Grad-CAM++ needs the volume's
    activation sums inside the gradient statistics of pass 1."""
    passes = st.plan.passes()
    st.plan.full_count()
    with st.hook.mode_as("stop"):
        for batch in st.run_batches(passes, "medcam statistics"):
            aw = st.runner.activations(st.plan.inputs(batch), st.hook)
            for j, p in enumerate(batch):
                st.keep(p, aw[j : j + 1])
            _add_activation_statistics(st, batch, aw)
    st.stats["activation_windows"] += len(passes)


def _add_activation_statistics(st: PlanState, batch: list[Pass], aw: torch.Tensor) -> None:
    """Add a batch's blended activation statistics ``aw`` ``[n, K, *f]`` into the volume's, per sample."""
    formula = st.formula
    assert isinstance(formula, ActivationPooledFormula)
    weight = torch.cat([flip(st.plan.blend(p[2])[None, None], p[3]) for p in batch])  # [n, 1, *roi]
    weight = _to_feature_grid(weight.float(), tuple(aw.shape[2:]))
    stats = formula.activation_statistics(aw, weight)
    for j, p in enumerate(batch):
        _add(st.act_stats.setdefault(p[0], {}), {n: v[j] for n, v in stats.items()})


def gradient_pass(st: PlanState) -> None:
    """Pass 1: forward + backward of the passes whose window touches an ROI; element-wise maps are stitched,
    pooled gradient statistics summed. With a fused prediction every pass runs (the others forward only) and its
    output goes into the plan's accumulation; after a one-pass prediction, only backward passes
    (:func:`one_pass_gradients`)."""
    plan = st.plan
    fused = st.fused
    active = {(b, i) for b in range(plan.batch) for i in range(len(plan.windows)) if st.active[b][i]}
    plan.count_for(len({i for _, i in active}))
    if isinstance(st.formula, ElementwiseFormula):
        st.open_acc(plan.passes(active))
    if st.graphs is not None:
        one_pass_gradients(st)
        return
    if fused is None:
        todo = plan.passes(active)
        for batch in st.run_batches(todo, "medcam windows"):
            _backward(st, batch)
        return
    with fused.context():
        for batch in st.run_batches(plan.passes(), "medcam windows"):
            if any(st.active[p[0]][p[2]] for p in batch):
                y = _backward(st, batch)
            else:
                y = _forward_output(st, batch)
            for j, p in enumerate(batch):
                fused.add(p, y[j : j + 1])


def _forward_output(st: PlanState, batch: list[Pass]) -> torch.Tensor:
    """The network output ``[n, C, *roi]`` of passes outside every ROI (no graph); pooled methods keep the
    layer's activation."""
    with st.hook.mode_as("detach"), torch.no_grad():
        st.hook.reset()
        y = st.runner.predictor(st.plan.inputs(batch))
    if isinstance(st.formula, PooledFormula) and st.hook.activation is not None:
        af = st.runner.to_feature_map(st.hook.activation, st.roi)
        for j, p in enumerate(batch):
            st.keep(p, af[j : j + 1])
    return y


def _backward(st: PlanState, batch: list[Pass], graph: Graph | None = None) -> torch.Tensor:
    """Forward of a batch with the graph from the hooked layer on (or its kept ``graph``), then one backward per
    target active in one of its windows (output gradient (1)). Returns the output (detached)."""
    y, a = graph if graph is not None else st.runner.forward(st.plan.inputs(batch), st.hook)
    if tuple(y.shape[2:]) != st.roi:
        raise MedcamError(f"the model output {tuple(y.shape)} is not on the window grid {st.roi}")
    af = st.runner.to_feature_map(a.detach(), st.roi)
    st.feat_shape = tuple(af.shape[2:])
    if isinstance(st.formula, PooledFormula):
        for j, p in enumerate(batch):
            st.keep(p, af[j : j + 1])
    ks = sorted({k for p in batch for k in st.active[p[0]][p[2]]})
    for n, k in enumerate(ks):
        rows = [j for j, p in enumerate(batch) if k in st.active[p[0]][p[2]]]
        go = _pass_gradient(st, batch, k, rows)
        g = st.runner.activation_grad(y, a, go, retain_graph=n < len(ks) - 1)
        g = st.runner.to_feature_map(g, st.roi)
        if st.output is None and st.fused is None:  # S = sum_p sum_u dS/dy_p * y_p (exact for logits)
            _add_pass_scores(st, batch, k, go, y)
        del go
        _use_gradient(st, batch, k, rows, af, g)
        del g
    return y.detach()


def _pass_gradient(st: PlanState, batch: list[Pass], k: int, rows: list[int]) -> torch.Tensor:
    """Equation (1) for target ``k`` on a batch: ``dS/dy_p`` ``[n, C, *roi]`` (zero in the rows outside ``rows``).

    Built just before its own backward pass and dropped after it, so only one target's window-sized gradient is
    alive at a time."""
    grad, plan = st.grads[k], st.plan
    go = torch.zeros((len(batch), st.n_out, *st.roi), dtype=plan.weight_dtype, device=plan.net_device)
    for j in rows:
        b, _, i, m = batch[j]
        gw = grad.window(b, plan.windows[i], plan.net_device) * plan.blend(i)
        go[j, grad.channels] = flip(gw[None], m)[0]
    return go


def _add_pass_scores(st: PlanState, batch: list[Pass], k: int, go: torch.Tensor, y: torch.Tensor) -> None:
    ch = st.grads[k].channels
    per_pass = (go[:, ch] * y.detach()[:, ch].float()).flatten(1).sum(1).double().cpu()
    for j, p in enumerate(batch):
        st.scores[k][p[0]] += per_pass[j]


def _use_gradient(st: PlanState, batch: list[Pass], k: int, rows: list[int], af: torch.Tensor, g: torch.Tensor) -> None:
    """Target ``k``'s activation gradient ``g`` ``[n, K, *f]`` of a batch: stitch the element-wise maps (flipped
    back), or add the pooled statistics of the passes where ``k`` is active."""
    formula = st.formula
    if isinstance(formula, ElementwiseFormula):
        m = st.upsampler(formula.map(af, g)[:, None], st.roi)
        for j in rows:
            st.stitch(batch[j], k, flip(m[j : j + 1], batch[j][3])[0, 0])
        return
    assert isinstance(formula, PooledFormula)
    volume_stats = None
    if st.act_stats:  # the whole volume's activation statistics, one row per pass of the batch
        names = st.act_stats[batch[0][0]]
        volume_stats = {n: torch.stack([st.act_stats[p[0]][n] for p in batch]) for n in names}
    stats = formula.gradient_statistics(af, g, volume_stats)
    for j in rows:
        _add(st.pooled.setdefault((batch[j][0], k), {}), {n: v[j] for n, v in stats.items()})


# ---------------------------------------------------------------------------------------------------- one pass
def one_pass_unavailable(st: PlanState, fuse: bool) -> str | None:
    """Why ``Y`` cannot be blended from the explanation's own pass (:mod:`medcam.kept_graphs`), or None."""
    plan = st.plan
    if not fuse:
        return "this method runs its own passes (not gradient passes): the prediction runs first"
    if plan.predict_calls is None and plan.accumulation is None:
        return "the framework forms this plan's prediction only in its own predictor"
    if plan.predict_calls is None and st.runner.amp:
        return "the framework's prediction runs without autocast (amp)"
    return None


def one_pass_prediction(st: PlanState) -> torch.Tensor:
    """``Y`` ``[B, C, *S]`` blended by the framework from one run of every pass, each with the graph after the
    hooked layer kept within the budget (:class:`~medcam.kept_graphs.GraphStore`); pooled formulas keep the
    activations (cache) and activation-pooled ones their volume statistics from the same pass."""
    plan, runner = st.plan, st.runner
    store = GraphStore(
        plan.batches(plan.passes()), st.graph_budget, plan.net_device, list(runner.model.parameters()), plan.n_folds
    )
    st.graphs = store
    if isinstance(st.formula, ActivationPooledFormula):  # every pass's blend weight: one count map
        plan.full_count()
    n_out = plan.n_out
    if plan.predict_calls is None and n_out is None:
        n_out = runner.output_channels(plan.first_window(), st.hook)

    def call(index: int, x: torch.Tensor) -> torch.Tensor:
        batch = store.batches[index]
        st.stats["passes"] += len(batch)
        if store.wants_graph():
            y, a = store.forward(index, batch[0][1], lambda: runner.forward(x, st.hook))
            act = a.detach()
        else:  # over the budget: no graph now, recomputed for its backward pass
            with st.hook.mode_as("detach"), torch.no_grad():
                st.hook.reset()
                y = runner.predictor(x)
            act = runner._captured(st.hook)
        if tuple(y.shape[2:]) != st.roi:
            raise MedcamError(f"the model output {tuple(y.shape)} is not on the window grid {st.roi}")
        if isinstance(st.formula, PooledFormula):
            af = runner.to_feature_map(act, st.roi)
            st.feat_shape = tuple(af.shape[2:])
            for j, p in enumerate(batch):
                st.keep(p, af[j : j + 1])
            if isinstance(st.formula, ActivationPooledFormula):
                _add_activation_statistics(st, batch, af)
        return y.detach()

    with st.hook.mode_as("grad"):
        y = framework_prediction(plan, runner, call, int(n_out or 0), st.load_fold, st.progress)
    if tuple(y.shape[2:]) != plan.spatial:
        raise MedcamError(f"the model output {tuple(y.shape)} is not on the input grid {plan.spatial}")
    return y.to(plan.device)


def one_pass_gradients(st: PlanState) -> None:
    """Pass 1 after :func:`one_pass_prediction`: one backward per target of each network call with an active pass,
    on its kept graph, or on a forward of the same batch again (over the budget: the same numbers)."""
    store = st.graphs
    assert store is not None
    need = [k for k, batch in enumerate(store.batches) if any(st.active[p[0]][p[2]] for p in batch)]
    for k in set(range(len(store.batches))) - set(need):
        store.drop(k)
    for k in st.bar(need, "medcam backward"):
        batch = store.batches[k]
        graph = store.take(k)
        if graph is None:
            st.load_fold(batch[0][1])
            st.stats["passes"] += len(batch)
            store.recomputed += 1
            graph = st.runner.forward(st.plan.inputs(batch), st.hook)
        _backward(st, batch, graph)
        del graph
    st.stats.update(store.stats())
    st.graphs = None


def map_pass(st: PlanState) -> None:
    """Pass 2 (pooled formulas): global channel weights ``alpha`` per (sample, target) from the summed statistics,
    then :func:`blend_pooled_maps`."""
    formula = st.formula
    assert isinstance(formula, PooledFormula)
    n_pos = feature_positions(st.plan, st.feat_shape)
    alpha = {
        (b, k): formula.weights(
            {n: v[None] for n, v in {**stats, **st.act_stats.get(b, {})}.items()}, n_pos, st.runner.layer_name
        )[0]
        for (b, k), stats in st.pooled.items()
    }
    blend_pooled_maps(st, alpha)


def blend_pooled_maps(st: PlanState, alpha: dict[tuple[int, int], torch.Tensor]) -> None:
    """Every pass's ``sum_k alpha_k A_pk``, upsampled, flipped back and blended with ``beta_p`` into ``st.acc``
    (activations from the cache, else a forward to the layer).

    ``alpha``: channel weights ``[K]`` per ``(sample b, target k)``; targets without an entry get no map. Also the
    map pass of methods whose weights come from elsewhere (MI-CAM's mutual information)."""
    plan = st.plan
    todo = [p for p in plan.passes() if any((p[0], k) in alpha for k in range(st.n_targets))]
    plan.full_count()
    st.open_acc(todo)
    cached = [p for p in todo if p in st.cache]
    with st.hook.mode_as("stop"):
        for p in cached:
            _blend_pass(st, p, st.cache[p].to(plan.net_device), alpha)
        forward = [p for p in todo if p not in st.cache]
        for batch in st.run_batches(forward, "medcam maps"):
            aw = st.runner.activations(plan.inputs(batch), st.hook)
            st.feat_shape = tuple(aw.shape[2:])
            for j, p in enumerate(batch):
                _blend_pass(st, p, aw[j : j + 1], alpha)
        st.stats["activation_windows"] += len(forward)


def _blend_pass(st: PlanState, p: Pass, aw: torch.Tensor, alpha: dict[tuple[int, int], torch.Tensor]) -> None:
    """One pass's maps ``sum_k alpha_k A_pk`` for its sample's targets, from its activation ``aw`` ``[1, K, *f]``."""
    b, _, i, m = p
    ks = [k for k in range(st.n_targets) if (b, k) in alpha]
    al = torch.stack([alpha[(b, k)] for k in ks]).to(aw.device)  # [k, K]
    mk = _weighted_channel_sum(al, aw.expand(len(ks), *aw.shape[1:]))
    mk = flip(st.upsampler(mk[None], st.roi), m)[0] * st.plan.blend(i, aw.device)
    for kk, k in enumerate(ks):
        st.stitch(p, k, mk[kk])


# ---------------------------------------------------------------------------------------------------- one pass
def explain_single_pass(
    runner: ModelRunner,
    formula: Formula,
    targets: list[Target],
    image: torch.Tensor,
    *,
    upsampler: Upsampler = interpolate_upsampler,
    relu: bool = True,
    upsample: bool = True,
) -> CAMResult:
    """A plan of one pass per sample (the whole image ``[B, Cin, *S]``): one forward pass with the graph, the
    targets' weights on its output, one backward pass per target, the formula's map of that one pass."""
    spatial = tuple(image.shape[2:])
    with runner.session("grad") as hook:
        y, a = runner.forward(image, hook)
        y_det = y.detach().float()
        af = runner.to_feature_map(a.detach(), spatial)
        scores, voxels, g_outs = [], [], []
        for t in targets:
            w = t.score_weights(y_det)
            voxels.append((t.roi(y_det) != 0).reshape(y_det.shape[0], -1).sum(1))
            g, s = runner.output_gradient(y_det, w)
            scores.append(s)
            g_out: torch.Tensor | None = g
            if not bool((g != 0).any()):
                logger.warning("target %r has an empty ROI: its map is all zero", t)
                g_out = None
            g_outs.append(g_out)
        grads = iter(runner.activation_grads(y, a, [g for g in g_outs if g is not None]))
        maps = [
            torch.zeros((af.shape[0], *af.shape[2:]), device=af.device)
            if g_out is None
            else formula.map(af, runner.to_feature_map(next(grads), spatial), runner.layer_name)
            for g_out in g_outs
        ]
        del y, a
    m = torch.stack(maps, dim=1)
    if upsample:
        m = upsampler(m, spatial)
    if relu:
        m = torch.relu(m)
    return CAMResult(
        maps=m.float().to(image.device),
        scores=torch.stack(scores, 1).float().cpu(),
        roi_voxels=torch.stack(voxels, 1).cpu(),
        targets=targets,
        layer=str(runner.layer_name),
        feature_shape=tuple(af.shape[2:]),
        output=y_det,
    )


# ---------------------------------------------------------------------------------------------------- helpers
def feature_positions(plan: PassPlan, feat_shape: tuple[int, ...]) -> float:
    """N: feature-grid positions covering the whole (unpadded) volume, at the layer's stride."""
    return float(math.prod(s * f / r for s, f, r in zip(plan.spatial, feat_shape, plan.roi_size)))


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


def _ix(*parts: Any) -> tuple[Any, ...]:
    """A tensor index from integers, slices and index lists (typed for mypy)."""
    return parts


def _shifted(start: Sequence[int], size: Sequence[int], lo: Sequence[int]) -> tuple[slice, ...]:
    """The slices of the block at ``start`` of ``size`` inside a buffer whose first voxel is ``lo``."""
    return tuple(slice(a - o, a - o + n) for a, n, o in zip(start, size, lo))


def _add(slot: Statistics, stats: Statistics) -> None:
    for n, v in stats.items():
        slot[n] = slot[n] + v.detach() if n in slot else v.detach().clone()
