"""Metric-guided synthesis of CAM expressions (SyCAM, Luque-Cerpa et al., arXiv 2504.09998) for segmentation.

:func:`synthesize` enumerates expressions of the grammar of :mod:`medcam.sycam` bottom-up by size, keeps one
expression per equivalence class (expressions whose values on random ``(A, g)`` inputs agree up to a positive factor
are one: a positive factor does not change a ReLU'd map's ranking, energy or curves), scores each on the training
(case, target) pairs with the metric, and returns the best as a :class:`~medcam.sycam.SynthesizedCAM`. The search is
bounded by expression size and wall time. Cases are split into training and validation cases; the report gives the
validation score of the result and of the built-in methods.

Each case costs one forward and backward pass (the activation and gradient are cached); a candidate's map is then
formed from the cache (pooled: ``sum_k alpha_k A_k``; element-wise: ``sum_k f(A_k, g_k)``), upsampled and ReLU'd as
the engine does. Metric names: ``"energy"`` (energy-based pointing game inside ``case.reference``, higher is better),
``"deletion"`` (deletion AUC of the case's ROI score, lower is better), ``"insertion"`` (higher is better), or a
callable ``metric(map [*S], case) -> float`` with ``higher_is_better``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from .engine import BaseSegCAM
from .errors import MedcamError
from .result import interpolate_upsampler
from .runner import validate_image
from .sycam import Expr, SynthesizedCAM, fingerprint, parse_expression, pooled_alpha, random_inputs
from .targets import Target

__all__ = ["SynthesisCase", "SynthesisReport", "synthesize", "enumerate_expressions", "POOLED_TERMS"]

logger = logging.getLogger(__name__)

#: leaves of the pooled grammar (per-channel sums additive over windows), constants, and of the element-wise one
POOLED_TERMS = ("sum(g)", "sum(A)", "sum(g*A)", "sum(g^2)", "sum(relu(g))", "sum(relu(g)*A)", "sum(A^2)", "N", "1", "2")
ELEMENTWISE_TERMS = ("g*A", "relu(g)*A")
BUILTINS = ("gradcam", "hirescam", "xgradcam", "gradcam++", "layercam")


@dataclass
class SynthesisCase:
    """One (case, target) pair.

    Attributes:
        image: ``[Cin, *S]`` or ``[1, Cin, *S]`` float tensor.
        target: the explained :class:`~medcam.targets.Target`.
        reference: ``[*S]`` reference mask for localisation metrics (e.g. the ROI or a ground truth), or None.
        name: label used in reports.
    """

    image: torch.Tensor
    target: Target
    reference: torch.Tensor | None = None
    name: str = ""


@dataclass
class SynthesisReport:
    """What the search did and found. Scores are means over (case, target) pairs (NaN pairs skipped)."""

    expression: str
    kind: str
    metric: str
    higher_is_better: bool
    train_cases: list[str]
    validation_cases: list[str]
    train_score: float
    validation_score: float
    builtin_validation: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    unique: int = 0
    scored: int = 0
    search_s: float = 0.0
    timed_out: bool = False
    top: list[tuple[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        arrow = "higher" if self.higher_is_better else "lower"
        lines = [
            f"SyCAM: {self.expression}  [{self.kind}]  metric={self.metric} ({arrow} is better)",
            f"  train {self.train_score:.4f} on {len(self.train_cases)} pairs; "
            f"validation {self.validation_score:.4f} on {len(self.validation_cases)} pairs",
            f"  search: {self.candidates} candidates, {self.unique} distinct, {self.scored} scored in "
            f"{self.search_s:.1f} s{' (time limit reached)' if self.timed_out else ''}",
        ]
        lines += [f"  {m:>10}: {v:.4f} (validation)" for m, v in self.builtin_validation.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- enumeration
def enumerate_expressions(
    max_size: int = 5, kinds: Sequence[str] = ("pooled", "elementwise"), seed: int = 0, stats: dict | None = None
):
    """Yield ``(Expr, fingerprint)`` of distinct expressions, smallest first (both kinds interleaved by size), up to
    ``max_size`` nodes (a ``sum(..)`` leaf counts as one node). The first expression of each equivalence class is
    kept; the others are pruned and never composed further. ``stats["generated"]`` counts every expression built,
    pruned ones included."""
    stats = {} if stats is None else stats
    stats.setdefault("generated", 0)
    gens = []
    if "elementwise" in kinds:
        gens.append(_enumerate_kind("elementwise", ELEMENTWISE_TERMS, ("+", "-"), max_size, seed, stats))
    if "pooled" in kinds:
        gens.append(_enumerate_kind("pooled", POOLED_TERMS, ("+", "-", "*", "/"), max_size, seed, stats))
    for _size, _n, e, fp in heapq.merge(*gens, key=lambda t: (t[0], t[1])):
        yield e, fp


def _enumerate_kind(
    kind: str, leaves: Sequence[str], kind_ops: Sequence[str], max_size: int, seed: int, stats: dict[str, int]
) -> Iterator[tuple[int, int, Expr, tuple | None]]:
    """``(size, serial, Expr, fingerprint)`` of one kind, bottom-up by size with observational-equivalence pruning."""
    envs = random_inputs(seed)
    seen: set = set()
    serial = itertools.count()
    by_size: dict[int, list[Expr]] = {1: []}
    for t in leaves:
        e = parse_expression(t, check=False)
        stats["generated"] += 1
        by_size[1].append(e)  # leaves (constants included) are always composable
        fp = fingerprint(e, envs) if (kind == "pooled" or e.uses("g")) else None
        if fp is not None and fp not in seen and (kind == "pooled" or _ok_elementwise(e)):
            seen.add(fp)
            yield 1, next(serial), e, fp
    for size in range(3, max_size + 1, 2):
        by_size[size] = []
        for s1 in range(1, size - 1, 2):
            for a, b in itertools.product(by_size.get(s1, []), by_size.get(size - 1 - s1, [])):
                for op in kind_ops:
                    e = Expr(op, (a, b))
                    stats["generated"] += 1
                    fp = fingerprint(e, envs)
                    if fp is None or fp in seen:
                        continue
                    seen.add(fp)
                    by_size[size].append(e)
                    yield size, next(serial), e, fp


def _ok_elementwise(e: Expr) -> bool:
    envs = random_inputs(1, draws=1)
    for env in envs:
        f1 = e.evaluate(env)
        f2 = e.evaluate({**env, "g": 2.5 * env["g"]})
        if not torch.allclose(torch.as_tensor(f2), 2.5 * torch.as_tensor(f1)):
            return False
    return True


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class _Cached:
    case: SynthesisCase
    image: torch.Tensor  # [1, Cin, *S]
    act: torch.Tensor  # [1, K, *f] float64
    grad: torch.Tensor
    output: torch.Tensor  # [1, C, *S]
    env: dict[str, Any]


def _cache_case(cam: BaseSegCAM, case: SynthesisCase) -> _Cached:
    image = validate_image(case.image if case.image.ndim >= 3 and case.image.shape[0] == 1 else case.image[None])
    runner = cam.runner
    runner.ensure_layer(image[:1])
    with runner.session("grad") as hook:
        y, a = runner.forward(image, hook)
        yd = y.detach().float()
        g_out, _ = runner.output_gradient(yd, case.target.score_weights(yd))
        g = runner.activation_grad(y, a, g_out)
        af = runner.to_feature_map(a.detach(), image.shape[2:]).double()
        gf = runner.to_feature_map(g, image.shape[2:]).double()
    n = float(math.prod(af.shape[2:]))
    return _Cached(case, image, af, gf, yd, {"A": af, "g": gf, "N": n})


def _candidate_map(expr: Expr, c: _Cached) -> torch.Tensor:
    """ReLU'd map ``[*S]`` of ``expr`` on a cached case, as the engine forms it."""
    if expr.kind == "elementwise":
        m = expr.evaluate(c.env).sum(1)
    else:
        alpha = pooled_alpha(expr, c.env)
        m = (alpha[(..., *([None] * (c.act.ndim - 2)))] * c.act).sum(1)
    m = interpolate_upsampler(m[:, None].float(), c.image.shape[2:])[0, 0]
    return torch.relu(m)


def _metric_fn(metric: str | Callable, model, deletion_steps: int) -> tuple[Callable, str, bool | None, bool]:
    """``(fn(map, cached) -> float, name, higher_is_better, needs_reference)``."""
    if callable(metric):
        return (lambda m, c: float(metric(m, c.case))), getattr(metric, "__name__", "user metric"), None, False
    from .metrics import deletion_curve, energy_pointing_game, insertion_curve, make_score_fn

    if metric == "energy":

        def energy(m, c):
            ref = c.case.reference.to(m.device)
            return float(energy_pointing_game(m[None], ref[None], spatial_dims=m.ndim)[0])

        return energy, "energy-in-ROI", True, True
    if metric in ("deletion", "insertion"):
        curve = deletion_curve if metric == "deletion" else insertion_curve

        def faithfulness(m, c):
            if not bool((m > 0).any()):
                return math.nan
            fn = make_score_fn(model, c.case.target.score_weights(c.output))
            return float(curve(c.image[0], m, fn, steps=deletion_steps, spatial_dims=m.ndim).auc[0])

        return faithfulness, f"{metric} AUC", metric == "insertion", False
    raise MedcamError(
        f"unknown metric {metric!r}; use 'energy', 'deletion', 'insertion' or a function metric(map, case) -> float"
    )


def _mean(vals: list[float]) -> float:
    v = [x for x in vals if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def _better(a: float, b: float, higher: bool) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if higher else a < b


# ---------------------------------------------------------------------------------------------------- the search
def synthesize(
    model: torch.nn.Module,
    layer: str | torch.nn.Module,
    cases: Sequence[SynthesisCase],
    metric: str | Callable[[torch.Tensor, SynthesisCase], float] = "energy",
    *,
    higher_is_better: bool | None = None,
    max_size: int = 5,
    time_limit: float = 60.0,
    validation_fraction: float = 0.3,
    seed: int = 0,
    kinds: Sequence[str] = ("pooled", "elementwise"),
    deletion_steps: int = 10,
    builtins: Sequence[str] = BUILTINS,
    progress: bool = False,
    **cam_kwargs: Any,
) -> SynthesizedCAM:
    """Search the SyCAM grammar for the expression that scores best on ``cases`` under ``metric``.

    Args:
        model, layer: the network and the hooked layer (as for any method).
        cases: (case, target) pairs; split at random (``seed``) into training and validation pairs.
        metric: ``"energy"`` (needs ``reference`` masks), ``"deletion"``, ``"insertion"``, or a callable
            ``metric(map [*S] float32 on the input grid, ReLU'd, case) -> float``.
        higher_is_better: required for a callable metric (default True for it); fixed for named metrics.
        max_size: largest expression size (nodes; a ``sum(..)`` term counts as one).
        time_limit: wall-time bound of the search in seconds (enumeration and scoring; caching cases excluded).
        validation_fraction: fraction of the pairs held out (at least one when there are two or more pairs).
        kinds: ``"pooled"`` and/or ``"elementwise"`` expressions.
        deletion_steps: steps of the deletion/insertion curves.
        builtins: built-in methods (:data:`medcam.METHODS` names) scored on the validation pairs for the report.
        cam_kwargs: passed to the returned :class:`SynthesizedCAM` (``inferer``, ``amp``, ...).
    Returns:
        A :class:`SynthesizedCAM` with ``.report`` (:class:`SynthesisReport`); ``.save(path)`` writes the expression.
    """
    cases = list(cases)
    fn, metric_name, hib = _checked_metric(cases, metric, model, deletion_steps, higher_is_better, kinds)
    for i, c in enumerate(cases):
        if not c.name:
            c.name = f"case{i}"
    val_idx, train_idx = _split_pairs(len(cases), validation_fraction, seed)
    probe = SynthesizedCAM(model, layer, expression="g*A")
    cached = [_cache_case(probe, c) for c in cases]
    train = [cached[i] for i in train_idx]
    val = [cached[i] for i in val_idx]
    search = _search(fn, train, hib, max_size=max_size, kinds=kinds, seed=seed, time_limit=time_limit,
                     progress=progress)  # fmt: skip
    best = search.best
    if best is None or math.isnan(best[1]):
        raise MedcamError(f"no expression gave a finite {metric_name} on the training pairs (all maps empty?)")
    expr = best[0]
    search.scores.sort(key=lambda t: (math.isnan(t[1]), -t[1] if hib else t[1]))
    report = SynthesisReport(
        expression=expr.text(),
        kind=expr.kind,
        metric=metric_name,
        higher_is_better=hib,
        train_cases=[cached[i].case.name for i in train_idx],
        validation_cases=[cached[i].case.name for i in val_idx],
        train_score=best[1],
        validation_score=_mean([fn(_candidate_map(expr, c), c) for c in val]),
        builtin_validation=_builtin_scores(model, layer, builtins, val, fn),
        candidates=search.enum_stats.get("generated", 0),
        unique=search.n_cand,
        scored=search.n_scored,
        search_s=search.seconds,
        timed_out=search.timed_out,
        top=search.scores[:10],
    )
    logger.info("%s", report.summary())
    cam = SynthesizedCAM(model, layer, expression=expr, **cam_kwargs)
    cam.report = report
    return cam


def _checked_metric(
    cases: list[SynthesisCase],
    metric: str | Callable[[torch.Tensor, SynthesisCase], float],
    model: torch.nn.Module,
    deletion_steps: int,
    higher_is_better: bool | None,
    kinds: Sequence[str],
) -> tuple[Callable[[torch.Tensor, Any], float], str, bool]:
    """Check the cases and the search settings (before any work): ``(metric function, its name, higher is better)``."""
    if not cases:
        raise MedcamError("synthesize needs at least one (case, target) pair")
    for c in cases:
        if not isinstance(c, SynthesisCase):
            raise MedcamError(f"cases must be medcam.synthesis.SynthesisCase, got {type(c).__name__}")
    fn, metric_name, hib, needs_ref = _metric_fn(metric, model, deletion_steps)
    if hib is None:
        hib = True if higher_is_better is None else bool(higher_is_better)
    elif higher_is_better is not None and bool(higher_is_better) != hib:
        raise MedcamError(f"metric {metric!r} is {'higher' if hib else 'lower'}-is-better; drop higher_is_better")
    if needs_ref:
        missing = [c.name or str(i) for i, c in enumerate(cases) if c.reference is None]
        if missing:
            raise MedcamError(
                f"metric {metric_name!r} needs reference masks, but cases {missing[:5]} have reference=None; give "
                "SynthesisCase(reference=mask) (e.g. the ROI or a ground-truth mask) or use metric='deletion'"
            )
    if not kinds or any(k not in ("pooled", "elementwise") for k in kinds):
        raise MedcamError(f"kinds must be a non-empty subset of ('pooled', 'elementwise'), got {kinds!r}")
    return fn, metric_name, hib


def _split_pairs(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``n`` pairs: ``(validation indices, training indices)``, at least one held out when
    there are two pairs or more."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = 0 if n < 2 else max(1, round(validation_fraction * n))
    if n_val == 0:
        logger.warning("one (case, target) pair: no validation pairs; the validation score is NaN")
    return order[:n_val], order[n_val:]


@dataclass
class _Search:
    """What the enumeration found: the best ``(expression, training score)``, every scored ``(text, score)``."""

    best: tuple[Expr, float] | None = None
    scores: list[tuple[str, float]] = field(default_factory=list)
    n_cand: int = 0
    n_scored: int = 0
    timed_out: bool = False
    seconds: float = 0.0
    enum_stats: dict[str, int] = field(default_factory=dict)


def _search(
    fn: Callable[[torch.Tensor, Any], float],
    train: list[_Cached],
    hib: bool,
    *,
    max_size: int,
    kinds: Sequence[str],
    seed: int,
    time_limit: float,
    progress: bool,
) -> _Search:
    """Score every distinct expression (smallest first) on the training pairs until done or ``time_limit`` s."""
    out = _Search()
    t0 = time.perf_counter()
    bar = tqdm(desc="SyCAM search", disable=not progress, unit="expr")
    for expr, _fp in enumerate_expressions(max_size, kinds, seed, out.enum_stats):
        out.n_cand += 1
        if time.perf_counter() - t0 > time_limit:
            out.timed_out = True
            break
        s = _mean([fn(_candidate_map(expr, c), c) for c in train])
        out.n_scored += 1
        bar.update(1)
        out.scores.append((expr.text(), s))
        if out.best is None or _better(s, out.best[1], hib):
            out.best = (expr, s)
    bar.close()
    out.seconds = time.perf_counter() - t0
    return out


def _builtin_scores(
    model: torch.nn.Module,
    layer: str | torch.nn.Module,
    builtins: Sequence[str],
    val: list[_Cached],
    fn: Callable[[torch.Tensor, Any], float],
) -> dict[str, float]:
    """The mean validation score of each built-in method, for the report."""
    from .methods import METHODS

    out: dict[str, float] = {}
    for name in builtins:
        cls = METHODS[name]
        vals = []
        for cv in val:
            m = cls(model, layer).explain(cv.image, [cv.case.target]).maps[0, 0]
            vals.append(fn(m, cv))
        out[name] = _mean(vals)
    return out
