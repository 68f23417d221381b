"""Kept autograd graphs: predicted-region explanations at the cost of one pass over the plan (issue 27).

A target defined by the model's own prediction (:class:`~medcam.targets.PredictedROI`, a probability score) needs
the blended prediction ``Y`` before any output gradient (equation (1) of :mod:`medcam.executor`) is known. Instead of
a separate inference pass, the executor runs every network call of the plan once with the graph of the part after
the hooked layer (the encoder still without a graph: the layer's output is a leaf), lets the framework blend ``Y``
from those outputs (MONAI's own ``sliding_window_inference``, nnU-Net's float16 accumulation), forms the targets'
ROIs, and then only runs the backward passes. This module holds what that needs besides the executor:

* :class:`GraphStore`: the graphs of the network calls, kept up to a byte budget of their saved tensors (counted
  with ``torch.autograd.graph.saved_tensors_hooks``; activations before the hooked layer are never saved). Calls
  over the budget run without a graph and are recomputed (forward with graph again, the same batch of passes) when
  their backward pass comes, so memory stays bounded and the results are the same either way.
* :func:`default_graph_budget`: half of the free memory where the graphs live (the GPU's ``mem_get_info`` for a
  CUDA network, else the host's available memory), and :func:`check_graph_budget`.
* :func:`framework_prediction`: ``Y`` of a plan whose network calls are made by a given function.

Fold weights. nnU-Net loads each fold's weights into the network in place; a graph of fold ``f`` that saved a
weight would read fold ``f+1``'s values at its backward pass (saved-tensor hooks bypass autograd's version check).
With several folds the store therefore saves one copy of each weight a graph saves, per fold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .errors import MedcamError

if TYPE_CHECKING:
    from .plan import Pass, PassPlan
    from .runner import ModelRunner

__all__ = ["GraphStore", "default_graph_budget", "check_graph_budget", "framework_prediction", "GRAPH_SHARE"]

logger = logging.getLogger(__name__)

#: share of the free memory the default budget takes (the rest for the network call in flight and the volumes)
GRAPH_SHARE = 0.5

#: ``(y [n, C, *roi] with graph from a, a [n, K, *f] leaf)`` of one network call
Graph = tuple[torch.Tensor, torch.Tensor]


def check_graph_budget(budget: Any) -> int | None:
    """``budget`` itself when it is None (default) or an int of bytes >= 0; else a :class:`MedcamError`."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise MedcamError(
            f"graph_budget must be None (default: {GRAPH_SHARE:.0%} of the free memory) or a number of bytes >= 0 "
            f"(0: keep no graph, recompute every pass), got {budget!r}"
        )
    return budget


def default_graph_budget(device: torch.device) -> int:
    """Bytes of saved tensors the kept graphs may hold: :data:`GRAPH_SHARE` of the free memory of ``device``'s
    kind (``torch.cuda.mem_get_info`` for a CUDA device, else the host's available memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(GRAPH_SHARE * free)


class GraphStore:
    """The graphs of a plan's network calls (batches of passes, by index), kept while their saved tensors fit the
    budget.

    Args:
        batches: the plan's network calls in its order (:meth:`~medcam.plan.PassPlan.batches` of every pass).
        budget: bytes of saved tensors (None: :func:`default_graph_budget` of ``device``).
        device: where the network runs.
        parameters: the network's parameters (their saved references are not counted; copied per fold when
            ``folds > 1``).
        folds: the plan's fold count.
    """

    def __init__(
        self,
        batches: list[list[Pass]],
        budget: int | None,
        device: torch.device,
        parameters: list[torch.nn.Parameter],
        folds: int,
    ):
        self.batches = batches
        given = check_graph_budget(budget)
        self.budget: int = default_graph_budget(device) if given is None else given
        self.graphs: dict[int, Graph] = {}
        self.sizes: dict[int, int] = {}
        self.kept_bytes = 0
        self.peak_bytes = 0
        self.last_size = 0
        self.recomputed = 0
        self._params = {id(p) for p in parameters}
        self._copy_params = folds > 1
        self._fold_params: dict[tuple[int, int], torch.Tensor] = {}
        self.param_copy_bytes = 0

    def wants_graph(self) -> bool:
        """Whether the next call may keep its graph: the budget holds one more call of the last one's size."""
        return self.budget > 0 and self.kept_bytes + self.last_size <= self.budget

    def forward(self, index: int, fold: int, run: Callable[[], Graph]) -> Graph:
        """``run()`` (a forward with graph) with its saved tensors counted; the graph is kept when it fits."""
        seen: set[int] = set()
        size = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) in self._params:
                return self._param(fold, t) if self._copy_params else t
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                size[0] += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, a = run()
        size[0] += y.numel() * y.element_size() + a.numel() * a.element_size()
        self.last_size = size[0]
        if self.kept_bytes + size[0] <= self.budget:
            self.graphs[index] = (y, a)
            self.sizes[index] = size[0]
            self.kept_bytes += size[0]
            self.peak_bytes = max(self.peak_bytes, self.kept_bytes)
        return y, a

    def _param(self, fold: int, t: torch.Tensor) -> torch.Tensor:
        """The fold's copy of a weight (made once per fold): the next fold's weights are loaded in place."""
        key = (fold, id(t))
        if key not in self._fold_params:
            self._fold_params[key] = t.detach().clone()
            self.param_copy_bytes += t.numel() * t.element_size()
        return self._fold_params[key]

    def take(self, index: int) -> Graph | None:
        """The kept graph of call ``index`` (handed over: the store forgets it), or None (to be recomputed)."""
        graph = self.graphs.pop(index, None)
        if graph is not None:
            self.kept_bytes -= self.sizes.pop(index)
        return graph

    def drop(self, index: int) -> None:
        """Free the graph of a call no backward pass needs."""
        self.take(index)

    def stats(self) -> dict[str, Any]:
        """For ``CAMResult.stats``: the budget, the largest total of kept graphs, kept/recomputed calls."""
        return {
            "graph_budget": int(self.budget),
            "graph_peak_bytes": int(self.peak_bytes + self.param_copy_bytes),
            "graph_calls_recomputed": int(self.recomputed),
        }


def framework_prediction(
    plan: PassPlan,
    runner: ModelRunner,
    call: Callable[[int, torch.Tensor], torch.Tensor],
    n_out: int,
    load_fold: Callable[[int], None],
    progress: bool,
) -> torch.Tensor:
    """``Y`` ``[B, C, *S]`` (float32) of ``plan``, each network call made by ``call(index, x) -> y`` (``index`` into
    ``plan.batches(plan.passes())``; ``y`` ``[n, C, *roi]`` detached), blended as the framework blends: the plan's ``predict_calls`` (MONAI's own
    ``sliding_window_inference``), else its ``accumulation`` (nnU-Net's float16 buffers) over the calls in the
    plan's order."""
    batches = plan.batches(plan.passes())
    if plan.predict_calls is not None:
        done = [0]

        def network(x: torch.Tensor) -> torch.Tensor:
            if done[0] >= len(batches) or x.shape[0] != len(batches[done[0]]):
                raise MedcamError("the framework's prediction called the network other than its pass plan says")
            done[0] += 1
            return call(done[0] - 1, x)

        y = plan.predict_calls(plan, runner, network, progress)
        if done[0] != len(batches):
            raise MedcamError("the framework's prediction skipped network calls of its pass plan")
        return y.as_tensor().float() if hasattr(y, "as_tensor") else y.float()
    if plan.accumulation is None:
        raise MedcamError("this plan cannot blend its prediction from its passes")
    acc = plan.accumulation(plan, n_out)
    with acc.context():
        for index, batch in enumerate(batches):
            load_fold(batch[0][1])
            y = call(index, plan.inputs(batch))
            for j, p in enumerate(batch):
                acc.add(p, y[j : j + 1])
    return acc.result().to(plan.device)
