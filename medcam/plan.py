"""Pass plans: the network passes whose outputs a framework blends into the prediction it produces.

A framework's prediction of a volume is a weighted sum of network passes. One pass ``p = (b, f, i, m)`` runs the
network with the weights of fold ``f`` on window ``i`` of sample ``b``, mirrored over the dims ``m``; its output
``y_p`` is flipped back and stitched into the window with the blend weight

    beta_p(u) = omega(u) / n(u) / (M F),      n(u) = sum_i omega_i(u)       (importance map ``omega``)

so that ``Y(u) = sum_p beta_p(u) flip_m(y_p)(u)``. The kinds:

* a whole image (:class:`WholeImagePlan`, :func:`whole_plan`): one pass per sample, ``beta = 1``;
* MONAI's sliding window (:func:`medcam.sliding.monai_plan`): one fold, no flips, MONAI's grid and importance map
  (constant or gaussian), float32 blending;
* nnU-Net (:mod:`medcam.frameworks.nnunet`): folds x tiles x mirrors with nnU-Net's Gaussian, and its float16
  buffer/count accumulation and fold mean (:class:`PredictorAccumulation`), bit-equal to ``nnUNetPredictor``.

A plan says nothing about CAMs: :mod:`medcam.executor` runs any plan for every method.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import MedcamError

if TYPE_CHECKING:
    from .hooks import ActivationHook
    from .runner import ModelRunner

__all__ = ["Pass", "PassPlan", "WholeImagePlan", "whole_plan", "flip", "PredictorAccumulation", "Accumulation"]

#: one network pass: ``(sample b, fold f, window i, mirror dims m of a [B, C, *S] tensor)``
Pass = tuple[int, int, int, tuple[int, ...]]

#: the framework's own prediction ``Y`` ``[B, C, *S]`` of a plan: ``predict(plan, runner, hook, progress)``
Predict = Callable[["PassPlan", "ModelRunner", "ActivationHook", bool], torch.Tensor]

#: the framework's own prediction ``Y`` ``[B, C, *S]`` with each network call made by the function given:
#: ``predict_calls(plan, runner, network, progress)``, ``network(x [n, Cin, *roi]) -> y [n, C, *roi]`` (the plan's
#: batches, in order)
PredictCalls = Callable[["PassPlan", "ModelRunner", Callable[[torch.Tensor], torch.Tensor], bool], torch.Tensor]


def flip(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` flipped over ``dims`` (dims of a ``[B, C, *S]`` tensor; nothing to do for ``()``)."""
    return torch.flip(t, dims) if dims else t


class Accumulation:
    """A rule that forms the prediction ``Y`` from the pass outputs in the plan's order (fused prediction)."""

    def add(self, p: Pass, y: torch.Tensor) -> None:
        """The output ``y`` ``[1, C, *window]`` of pass ``p``."""
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        """``Y`` ``[B, C, *S]`` float32."""
        raise NotImplementedError

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """Settings the passes run under so that ``Y`` is the framework's to the bit (e.g. thread count)."""
        return contextlib.nullcontext()


@dataclass
class PassPlan:
    """The passes of one prediction (module docstring) and where they stitch.

    Attributes:
        image: ``[B, Cin, *P]`` the input padded as the framework pads it.
        crop: spatial slices of the unpadded volume ``S`` inside ``P``.
        windows: spatial slices of every window in ``P`` (the framework's order); all of size ``roi_size``.
        importance: ``omega`` ``[*roi_size]`` in the weight dtype (float32; float64 for a float64 nnU-Net network).
        count: ``n = sum_i omega_i`` ``[*P]`` (weight dtype), or None: built only when many windows run
            (:meth:`full_count`); for a few windows (a small ROI) :meth:`blend` forms ``n`` per window from the windows
            that overlap it, adding in the plan's window order as the count map does (bit-equal), so that no volume
            is held for it.
        device: where volume-sized buffers (maps, output gradients) live.
        net_device: where the network runs.
        mirrors: the flips of each window, identity first (dims of ``[B, C, *S]``); ``[()]``: none.
        folds: one ``state_dict`` per fold, loaded before the fold's passes (restored after); None: the network as
            it is.
        batch_size: passes per network call (MONAI's ``sw_batch_size``; passes of one fold only).
        input_dtype: dtype the windows are cast to (None: the image's).
        predict: the framework's prediction ``Y`` (when a target or the score needs it first).
        predict_calls: the framework's prediction with its network calls made by medcam (``PredictCalls``), so that
            one pass gives both ``Y`` and the graphs of the explanation (:mod:`medcam.kept_graphs`); None: from
            ``accumulation`` if set, else ``Y`` needs ``predict`` (a second pass).
        accumulation: forms ``Y`` from the gradient pass's own outputs (fused prediction), or None.
        prediction_always: the result carries ``Y`` even when nothing needs it (nnU-Net's result does).
        n_out: the output channel count when known without a pass (else one window's forward tells).
        example: a zero input for ``layer="auto"`` (default: one window).
        cache_bytes: pooled methods keep the layer's activation of each pass up to this many bytes of host memory
            (no second forward in the map pass).
        description: plan kind and sizes, for ``CAMResult.stats``.
    """

    image: torch.Tensor
    crop: tuple[Any, ...]
    windows: list[tuple[Any, ...]]
    importance: torch.Tensor
    count: torch.Tensor | None
    device: torch.device
    net_device: torch.device
    mirrors: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    folds: list[dict[str, torch.Tensor]] | None = None
    batch_size: int = 1
    input_dtype: torch.dtype | None = None
    predict: Predict | None = None
    predict_calls: PredictCalls | None = None
    accumulation: Callable[[PassPlan, int], Accumulation] | None = None
    prediction_always: bool = False
    n_out: int | None = None
    example: torch.Tensor | None = None
    cache_bytes: int = 0
    description: dict[str, Any] = field(default_factory=dict)
    _last_blend: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.windows:
            raise MedcamError("a pass plan needs at least one window")
        if self.batch_size < 1:
            raise MedcamError(f"batch_size must be >= 1, got {self.batch_size}")

    # ------------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return int(self.image.shape[0])

    @property
    def spatial(self) -> tuple[int, ...]:
        """``S``: the unpadded volume's spatial shape."""
        return tuple(len(range(*s.indices(n))) for s, n in zip(self.crop, self.image.shape[2:]))

    @property
    def padded_size(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.image.shape[2:])

    @property
    def roi_size(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.importance.shape)

    @property
    def n_folds(self) -> int:
        return 1 if self.folds is None else len(self.folds)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.importance.dtype

    @property
    def single_pass(self) -> bool:
        """One pass per sample whose window is the whole volume (its blend weight is 1)."""
        return False

    def passes(self, windows: set[tuple[int, int]] | None = None) -> list[Pass]:
        """Every pass in the framework's order (fold, sample, window, mirror), or those of the ``(b, i)`` given."""
        return [
            (b, f, i, m)
            for f in range(self.n_folds)
            for b in range(self.batch)
            for i in range(len(self.windows))
            if windows is None or (b, i) in windows
            for m in self.mirrors
        ]

    def batches(self, passes: list[Pass]) -> list[list[Pass]]:
        """``passes`` in runs of at most ``batch_size`` of one fold."""
        out: list[list[Pass]] = []
        for p in passes:
            if out and len(out[-1]) < self.batch_size and out[-1][0][1] == p[1]:
                out[-1].append(p)
            else:
                out.append([p])
        return out

    def inputs(self, batch: list[Pass]) -> torch.Tensor:
        """The network input ``[n, Cin, *roi]`` of a batch of passes (windows mirrored), on ``net_device``."""
        x = torch.cat([flip(self.image[(slice(b, b + 1), slice(None), *self.windows[i])], m) for b, _, i, m in batch])
        return x.to(device=self.net_device, dtype=self.input_dtype or x.dtype)

    def full_count(self) -> None:
        """Build the volume-sized count map ``n = sum_i omega_i`` (window order, on ``device``), for passes over many
        windows (else :meth:`blend` forms ``n`` per window)."""
        if self.count is None:
            count = torch.zeros(self.padded_size, dtype=self.weight_dtype, device=self.device)
            imp = self.importance.to(self.device)
            for s in self.windows:
                count[s] += imp
            self.count = count
            self._last_blend = None

    def count_for(self, n_windows: int) -> None:
        """Build the count map when ``n_windows`` of the plan's windows are about to be blended: one volume-sized
        map is cheaper than one sum per window when they are many (more than an eighth of all)."""
        if 8 * n_windows > len(self.windows):
            self.full_count()

    def window_count(self, i: int, device: torch.device) -> torch.Tensor:
        """``n`` on window ``i`` ``[*roi]``: from the count map, else summed from the windows that overlap it, in the
        plan's window order (the count map's additions, hence bit-equal)."""
        here = self.windows[i]
        if self.count is not None:
            return self.count[here].to(device)
        imp = self.importance.to(device)
        count = torch.zeros(self.roi_size, dtype=self.weight_dtype, device=device)
        for other in self.windows:
            inter = [(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(here, other)]
            if all(lo < hi for lo, hi in inter):
                dst = tuple(slice(lo - a.start, hi - a.start) for (lo, hi), a in zip(inter, here))
                src = tuple(slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(inter, other))
                count[dst] += imp[src]
        return count

    def blend(self, i: int, device: torch.device | None = None) -> torch.Tensor:
        """``omega / n / (M F)`` of window ``i`` in volume orientation: ``[*roi]`` (weight dtype)."""
        device = device or self.net_device
        last = self._last_blend
        if last is None or last[0] != i or last[1].device != device:
            share = len(self.mirrors) * self.n_folds
            w = self.importance.to(device) / self.window_count(i, device)
            last = (i, w / share if share > 1 else w)
            self._last_blend = last  # a window's passes, targets and maps follow each other
        return last[1]

    def pad(self, volume: torch.Tensor) -> torch.Tensor:
        """A ``[B, ..., *S]`` tensor placed into zeros ``[B, ..., *P]`` at the volume's crop."""
        out = volume.new_zeros((*volume.shape[: volume.ndim - len(self.crop)], *self.padded_size))
        out[(..., *self.crop)] = volume
        return out

    def first_window(self) -> torch.Tensor:
        """The first pass's input ``[1, Cin, *roi]``."""
        return self.inputs([self.passes()[0]])

    def layer_example(self) -> torch.Tensor:
        """A zero input to resolve ``layer="auto"`` on (the plan's ``example`` or one window)."""
        if self.example is not None:
            return self.example
        x = self.image
        return torch.zeros((1, x.shape[1], *self.roi_size), dtype=self.input_dtype or x.dtype, device=self.net_device)

    def sample(self, b: int) -> PassPlan:
        """The plan of sample ``b`` alone."""
        return dataclasses.replace(self, image=self.image[b : b + 1])

    @contextlib.contextmanager
    def fold_weights(self, model: torch.nn.Module) -> Iterator[Callable[[int], None]]:
        """``load(f)`` puts fold ``f``'s weights into ``model`` (when it does not hold them; ``load(-1)``: forget which
        it holds); the model's own weights are restored on exit. Without folds, ``load`` does nothing."""
        if self.folds is None:
            yield lambda f: None
            return
        folds = self.folds
        original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        held = [-1]

        def load(f: int) -> None:
            if f < 0:  # the model's weights were changed by someone else: load the next fold again
                held[0] = -1
            elif held[0] != f:
                model.load_state_dict(folds[f])
                held[0] = f

        try:
            yield load
        finally:
            model.load_state_dict(original)


class WholeImagePlan(PassPlan):
    """One pass per sample on the whole image: the executor runs it as one batched forward pass."""

    @property
    def single_pass(self) -> bool:
        return True


def whole_plan(image: torch.Tensor) -> WholeImagePlan:
    """The plan of a model run on the whole image ``[B, Cin, *S]``: one pass, blend weight 1."""
    spatial = tuple(int(s) for s in image.shape[2:])
    whole = tuple(slice(0, s) for s in spatial)
    ones = torch.ones(spatial, dtype=torch.float32, device=image.device)
    return WholeImagePlan(
        image=image,
        crop=whole,
        windows=[whole],
        importance=ones,
        count=ones,
        device=image.device,
        net_device=image.device,
        description={"plan": "whole"},
    )


class PredictorAccumulation(Accumulation):
    """``Y`` from the passes as ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (nnunetv2 2.8) forms it
    on the CPU, operation by operation (passes in its order: fold, tile, mirror).

    Per fold: each tile's outputs summed over the mirrors (network dtype, identity first, the others flipped back)
    and divided by ``M`` (only when mirroring); times the float16 Gaussian; added into a float16 ``[C, *P]`` buffer
    and the Gaussian into a float16 count; buffer / count in float16, cropped. The folds' results summed in float16
    and divided by ``F``; float32 at the end.

    Args:
        plan: the plan (one sample).
        n_out: output channels ``C``.
        gaussian: the float16 importance map ``[*patch]`` as the predictor computes it, or None (no Gaussian).
        threads: the predictor's thread count (its ``default_num_processes``), set during the passes.
    """

    def __init__(self, plan: PassPlan, n_out: int, gaussian: torch.Tensor | None, threads: int | None = None):
        self.plan, self.n_out, self.gauss, self.threads = plan, n_out, gaussian, threads
        self.tile_sum: torch.Tensor | None = None
        self.logits = torch.zeros(0)
        self.count = torch.zeros(0)
        self.total: torch.Tensor | None = None

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        n = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(min(self.threads, n))
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return self._threads()

    def add(self, p: Pass, y: torch.Tensor) -> None:
        _, _, i, m = p
        mirrors = self.plan.mirrors
        if not m:  # the identity comes first
            self.tile_sum = y.detach().clone()
        else:
            assert self.tile_sum is not None
            self.tile_sum += torch.flip(y.detach(), m)
        if m != mirrors[-1]:
            return
        if len(mirrors) > 1:  # the predictor divides only when it mirrors
            self.tile_sum /= len(mirrors)
        self._end_tile(i)

    def _end_tile(self, i: int) -> None:
        plan = self.plan
        assert self.tile_sum is not None
        pred, self.tile_sum = self.tile_sum[0].to("cpu"), None
        if i == 0:  # a new fold: the predictor's fresh float16 buffers
            self.logits = torch.zeros((self.n_out, *plan.padded_size), dtype=torch.half)
            self.count = torch.zeros(plan.padded_size, dtype=torch.half)
        if self.gauss is not None:
            pred *= self.gauss
        self.logits[(slice(None), *plan.windows[i])] += pred
        self.count[plan.windows[i]] += self.gauss if self.gauss is not None else 1
        if i == len(plan.windows) - 1:
            torch.div(self.logits, self.count, out=self.logits)
            if bool(torch.isinf(self.logits).any()):
                raise MedcamError("the float16 accumulation of the logits overflowed (inf), as nnU-Net's predictor's")
            fold = self.logits[(slice(None), *plan.crop)]
            self.total = fold if self.total is None else self.total.add_(fold)

    def result(self) -> torch.Tensor:
        """``Y`` ``[1, C, *S]`` float32."""
        assert self.total is not None
        if self.plan.n_folds > 1:
            self.total /= self.plan.n_folds
        return self.total.float()[None]
