"""Map similarity measures and the cascading model-parameter randomisation test (Adebayo et al. 2018).

Similarities compare maps flattened per row: ``a``, ``b`` of shape ``[..., *S]`` give ``[...]``.

Constant ("dead") maps. A CAM is often exactly constant (all zeros after the ReLU: a dead map), e.g. after the
randomisation of a sanity check. Correlation and structure are undefined for a constant map (zero variance), so
every similarity here follows one documented convention (``constant="convention"``, the default):

* exactly one of the two maps is constant -> similarity ``0.0`` (no shared rank order or structure: the map has
  changed completely; this is also the limit of a nearly constant map, whose noise fills [0, 1] after the min-max
  normalisation and decorrelates it);
* both maps are constant -> ``1.0`` (they are equal up to the affine change of intensity that every measure here
  ignores).

``constant="nan"`` returns NaN instead whenever a map is constant (the mathematical value; aggregate with
``nanmean`` and count the NaNs yourself). "Constant" means max == min exactly over the map; :class:`SanityResult`
also flags the constant maps of every randomisation step (``constant``).

Frozen targets. Adebayo et al. explain a fixed output of the network while its weights are randomised. A target
defined by the model's own prediction (``PredictedROI``, ``ComponentROI``) would instead be re-predicted by every
randomised model and move (typically to an empty region, killing the map), so the test would measure the drift of the
target, not the map's dependence on the weights. :func:`freeze_targets` fixes every target to the region it has on
the trained model's output (a ``MaskROI`` of it); :func:`cascading_randomization` does this with ``targets=`` and
``image=``, and :func:`medcam.evaluation.evaluate` always does it.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import MedcamError
from ..targets import ContrastROI, MaskROI, Target, as_target_list
from .thresholds import _flat, _lead, check_maps, normalize_maps

__all__ = [
    "rankdata",
    "is_constant",
    "spearman",
    "pearson",
    "ssim",
    "map_similarity",
    "SanityResult",
    "freeze_targets",
    "cascading_randomization",
]

logger = logging.getLogger(__name__)

Similarity = Literal["spearman", "pearson", "ssim"]
ConstantPolicy = Literal["convention", "nan"]


def is_constant(maps: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """True per map where every value is the same (max == min): ``[..., *S] -> [...]`` bool."""
    check_maps(maps, spatial_dims)
    flat = _flat(maps, spatial_dims)
    return (flat.amax(1) == flat.amin(1)).reshape(_lead(maps, spatial_dims))


def _apply_constant_policy(
    sim: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spatial_dims: int, constant: ConstantPolicy
) -> torch.Tensor:
    """Replace the similarity of constant maps by the module's convention (or NaN); ``sim`` is ``[...]``."""
    if constant not in ("convention", "nan"):
        raise MedcamError(f"constant must be 'convention' or 'nan', got {constant!r}")
    ca, cb = is_constant(a, spatial_dims).to(sim.device), is_constant(b, spatial_dims).to(sim.device)
    if constant == "nan":
        return torch.where(ca | cb, torch.full_like(sim, float("nan")), sim)
    return torch.where(ca & cb, torch.ones_like(sim), torch.where(ca | cb, torch.zeros_like(sim), sim))


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dim with ties given their average rank (as ``scipy.stats.rankdata``). ``[R, n]``."""
    r, n = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    xs = torch.gather(x, 1, order)
    new_group = torch.ones_like(xs, dtype=torch.bool)
    new_group[:, 1:] = xs[:, 1:] != xs[:, :-1]
    gid = torch.cumsum(new_group.long(), dim=1) - 1  # group id per sorted position
    pos = torch.arange(1, n + 1, device=x.device, dtype=torch.float64).expand(r, n)
    ngroups = n
    sums = torch.zeros(r, ngroups, dtype=torch.float64, device=x.device).scatter_add_(1, gid, pos)
    cnts = torch.zeros(r, ngroups, dtype=torch.float64, device=x.device).scatter_add_(1, gid, torch.ones_like(pos))
    avg = torch.gather(sums / cnts.clamp_min(1), 1, gid)
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks


def _pearson_flat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def _pair(a: torch.Tensor, b: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_maps(a, spatial_dims, "a")
    check_maps(b, spatial_dims, "b")
    if a.shape != b.shape:
        raise MedcamError(f"maps to compare have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def spearman(
    a: torch.Tensor, b: torch.Tensor, spatial_dims: int = 3, constant: ConstantPolicy = "convention"
) -> torch.Tensor:
    """Spearman rank correlation per map: Pearson correlation of the average ranks (ties averaged).

    Args:
        a, b: ``[..., *S]`` of equal shape.
        constant: ``"convention"`` (default): a constant (dead) map has similarity 0 with a non-constant map and
            1 with another constant map; ``"nan"``: NaN whenever a map is constant (see the module docstring).
    Returns:
        ``[...]`` float32 in [-1, 1].
    """
    a, b = _pair(a, b, spatial_dims)
    r = _pearson_flat(rankdata(_flat(a.float(), spatial_dims)), rankdata(_flat(b.float(), spatial_dims)))
    r = r.float().reshape(_lead(a, spatial_dims))
    return _apply_constant_policy(r, a, b, spatial_dims, constant)


def pearson(
    a: torch.Tensor, b: torch.Tensor, spatial_dims: int = 3, constant: ConstantPolicy = "convention"
) -> torch.Tensor:
    """Pearson correlation per map ``cov(a, b) / (sd(a) sd(b))``; ``[..., *S] -> [...]``.

    A constant map follows ``constant`` as in :func:`spearman` (0 against a non-constant map, 1 against a constant
    one; NaN with ``constant="nan"``).
    """
    a, b = _pair(a, b, spatial_dims)
    r = _pearson_flat(_flat(a, spatial_dims), _flat(b, spatial_dims)).float().reshape(_lead(a, spatial_dims))
    return _apply_constant_policy(r, a, b, spatial_dims, constant)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    spatial_dims: int = 3,
    normalize: Literal["minmax", "max"] | None = "minmax",
    win_size: int = 7,
    constant: ConstantPolicy = "convention",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per map, on maps normalised to [0, 1] (data range 1).

    ``SSIM = mean_u (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))`` with local
    statistics over a uniform ``win_size``^d window (sample covariance), ``C1 = 0.01^2``, ``C2 = 0.03^2``, averaged
    over the valid window positions: MONAI's ``compute_ssim_and_cs`` (uniform kernel), equal to
    ``skimage.metrics.structural_similarity(a, b, data_range=1, win_size=7)``.

    A constant (dead) map follows ``constant`` as in :func:`spearman`: 0 against a non-constant map, 1 against a
    constant one (NaN with ``constant="nan"``). Without this convention a dead map would score high against any
    sparse CAM (their shared zero background counts as perfectly similar windows), which would make a sanity check
    whose randomised map dies look as if the map had not changed.

    Args:
        a, b: ``[..., *S]``, every spatial size >= ``win_size``.
        constant: ``"convention"`` or ``"nan"``.
    Returns:
        ``[...]`` float32.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    a, b = _pair(a, b, spatial_dims)
    spatial = tuple(a.shape[a.ndim - spatial_dims :])
    if min(spatial) < win_size:
        raise MedcamError(f"ssim needs every spatial size >= win_size={win_size}, got {spatial}; lower win_size")
    an = normalize_maps(a, normalize, spatial_dims).reshape(-1, 1, *spatial)
    bn = normalize_maps(b, normalize, spatial_dims).reshape(-1, 1, *spatial)
    s, _ = compute_ssim_and_cs(an, bn, spatial_dims, [win_size] * spatial_dims, [1.5] * spatial_dims, 1.0, "uniform")
    s = s.flatten(1).mean(1).float().reshape(_lead(a, spatial_dims))
    return _apply_constant_policy(s, a, b, spatial_dims, constant)


def map_similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    measure: Similarity = "spearman",
    spatial_dims: int = 3,
    constant: ConstantPolicy = "convention",
) -> torch.Tensor:
    """Dispatch to :func:`spearman`, :func:`pearson` or :func:`ssim` (same constant-map convention)."""
    fns: dict[str, Callable[..., torch.Tensor]] = {"spearman": spearman, "pearson": pearson, "ssim": ssim}
    if measure not in fns:
        raise MedcamError(f"similarity must be one of {sorted(fns)}, got {measure!r}")
    return fns[measure](a, b, spatial_dims=spatial_dims, constant=constant)


@dataclass
class SanityResult:
    """Cascading randomisation: step 0 is the trained model, step i has the last i layers re-initialised.

    Attributes:
        layers: names of the randomised layers, in the order they were re-initialised (output first); step i
            (1-based) randomised ``layers[:i]``.
        similarity: measure name -> ``[steps + 1, ...]`` similarity of each step's map with the original map
            (constant maps follow the module's convention: 0 against a non-constant original map).
        constant: ``[steps + 1, ...]`` bool, True where that step's map is constant (dead, e.g. all zero after
            the ReLU); step 0 is the original map, and if it is constant the whole test is uninformative.
        maps: the maps per step if ``keep_maps`` (list of tensors), else empty.
        steps: number of layers randomised at each row (``[0, 1, 2, ...]``; thinned out with ``max_steps``): row
            ``j`` randomised ``layers[:steps[j]]``.
        frozen_targets: the targets frozen to the trained model's output and given to every ``map_fn`` call (when
            ``targets=`` was passed), else empty.
    """

    layers: list[str]
    similarity: dict[str, torch.Tensor]
    constant: torch.Tensor | None = None
    maps: list[torch.Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    frozen_targets: list[Target] = field(default_factory=list)


class _FixedWeights(Target):
    """A target whose score weights ``W`` are fixed (for custom targets that define their own ``score_weights``)."""

    def __init__(self, weights: torch.Tensor, roi: torch.Tensor, channel: int, name: str):
        super().__init__(channel)
        self.weights, self.mask, self._name = weights, roi, name

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        return self.mask.to(output.device).expand(output.shape[0], *self.mask.shape[1:]).clone()

    def score_weights(self, output: torch.Tensor) -> torch.Tensor:
        if tuple(self.weights.shape[1:]) != tuple(output.shape[1:]):
            raise MedcamError(
                f"frozen target weights {tuple(self.weights.shape)} do not fit output {tuple(output.shape)}"
            )
        return self.weights.to(output.device).expand(output.shape[0], *self.weights.shape[1:]).clone()

    @property
    def name(self) -> str:
        return self._name


def freeze_targets(targets: Target | Sequence[Target], output: torch.Tensor) -> list[Target]:
    """Every target fixed to the region it has on ``output`` (the trained model's output on the explained image).

    A target's region ``M = target.roi(output)`` becomes ``MaskROI(M, target.channel)``; a ``ContrastROI`` keeps its
    reference channel and ``alpha`` with its region frozen; a custom target overriding ``score_weights`` gets its
    weights ``W = target.score_weights(output)`` fixed. Targets that do not depend on the prediction are unchanged in
    effect (their frozen weights are the same).

    Args:
        targets: :mod:`medcam.targets` objects.
        output: model output ``[1, C, *S]`` (detached logits of the trained model).
    Returns:
        list of targets, one per input target, whose score weights no longer depend on the model's output.
    """
    if not isinstance(output, torch.Tensor) or output.ndim < 3:
        raise MedcamError("output must be the model output tensor [1, C, *S] of the explained image")
    out = output.detach()
    frozen: list[Target] = []
    for t in as_target_list(targets):
        roi = t.roi(out).detach()
        if isinstance(t, ContrastROI):
            f: Target = ContrastROI(t.channel, t.reference_channel, t.alpha, MaskROI(roi, t.channel))
        elif type(t).score_weights is Target.score_weights:
            f = MaskROI(roi, t.channel)
        else:
            f = _FixedWeights(t.score_weights(out).detach(), roi, t.channel, t.name)
        frozen.append(f)
    return frozen


def _reinit(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for _, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            if p.ndim >= 2:
                nn.init.kaiming_uniform_(p)
            else:
                nn.init.normal_(p, std=0.1)


def _param_hooks(model: nn.Module, record: Callable[[str], None]) -> list:
    handles = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_hook(lambda m, i, o, name=name: record(name)))
    return handles


def _execution_order(
    model: nn.Module, map_fn: Callable[[nn.Module], torch.Tensor], original: nn.Module | None = None
) -> tuple[list[str], torch.Tensor, bool]:
    """Names of the modules holding parameters directly, in forward execution order, the map of ``model``, and
    whether ``map_fn`` ran ``original`` (the user's model) instead."""
    order: list[str] = []
    ran_original: list[str] = []
    handles = _param_hooks(model, lambda n: order.append(n) if n not in order else None)
    if original is not None:
        handles += _param_hooks(original, ran_original.append)
    try:
        m0 = map_fn(model)
    finally:
        for h in handles:
            h.remove()
    return order, m0, bool(ran_original)


def _bind_targets(map_fn: Callable[..., torch.Tensor], frozen: list[Target]) -> Callable[[nn.Module], torch.Tensor]:
    """``map_fn(model, frozen)`` as a one-argument map function."""

    def fn(m: nn.Module) -> torch.Tensor:
        return map_fn(m, frozen)

    return fn


def _no_model_run_message(model: nn.Module, ran_original: bool) -> str:
    if not any(True for _ in model.parameters()):
        return "the model has no parameters to randomise"
    if ran_original:
        return (
            "map_fn ran the original model, not the model it was given: the cascade randomises a copy, which map_fn "
            "must use, e.g. map_fn=lambda m: SegGradCAM(m, layer)(image, targets) (not a model captured from outside)"
        )
    return (
        "map_fn(model) ran none of the parametrised modules of the model it was given, so its map cannot depend on "
        "the weights and the layers' execution order is unknown: compute the map from map_fn's argument, e.g. "
        "map_fn=lambda m: SegGradCAM(m, layer)(image, targets); to test a map that deliberately ignores the model, "
        "pass layers=[...] explicitly"
    )


def cascading_randomization(
    model: nn.Module,
    map_fn: Callable[..., torch.Tensor],
    layers: Sequence[str] | None = None,
    measures: Sequence[Similarity] = ("spearman", "ssim"),
    spatial_dims: int = 3,
    seed: int = 0,
    keep_maps: bool = False,
    max_steps: int | None = None,
    targets: Target | Sequence[Target] | None = None,
    image: torch.Tensor | None = None,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> SanityResult:
    """Cascading model-parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps").

    A deep copy of ``model`` is randomised layer by layer from the output backwards (each layer keeps its
    randomisation as the next is added: cascading) with the layers' own ``reset_parameters`` (PyTorch default
    initialisation; BatchNorm statistics are reset too); after each step ``map_fn(copy)`` is compared with the map of
    the trained model. A trustworthy method's similarity must drop. The user's model is never modified; the global
    RNG state is restored.

    Args:
        model: the trained model.
        map_fn: ``map_fn(model) -> maps [..., *S]`` (e.g. ``lambda m: SegGradCAM(m, layer)(image, targets)``); it is
            also run once with forward hooks to find the execution order of the parametrised modules.
        layers: dotted module names to randomise, output first (default: every module that owns parameters,
            in reverse execution order).
        measures: similarity measures (``"spearman"``, ``"ssim"``, ``"pearson"``) with the original map.
        seed: seed of the re-initialisation.
        keep_maps: also return the maps of every step.
        max_steps: compute the map after at most this many cascade steps, evenly spaced over the layers and always
            including the last (every layer still gets randomised in cascade; only the costly ``map_fn`` calls are
            thinned out): for networks with dozens of parametrised modules. None: after every layer.
        targets, image: freeze the targets (recommended for targets defined by the prediction, see the module
            docstring): the trained model's output on ``image`` (``[1, Cin, *S]``) fixes every target's region
            (:func:`freeze_targets`) before the cascade, and ``map_fn`` is then called as ``map_fn(model,
            frozen_targets)`` at every step, e.g. ``lambda m, t: SegGradCAM(m, layer)(image, t)``.
        forward: ``forward(model, image) -> output [1, C, *S]`` for the frozen regions (default ``model(image)``;
            e.g. ``lambda m, x: inferer(x, m)`` for sliding windows).
    Returns:
        :class:`SanityResult`; ``similarity[m][0]`` compares the trained model with itself (1 unless ``map_fn`` is
        random); ``steps`` says how many layers were randomised at each row.
    """
    _check_cascade_args(max_steps, measures, targets, image)
    net = copy.deepcopy(model)
    frozen: list[Target] = []
    fn: Callable[[nn.Module], torch.Tensor] = map_fn
    if targets is not None and image is not None:
        fn, frozen = _freeze_map_fn(net, map_fn, targets, image, forward)
    layer_list, m0 = _cascade_layers(net, fn, model, layers)
    check_maps(m0, spatial_dims, "map_fn(model)")
    sims: dict[str, list[torch.Tensor]] = {m: [map_similarity(m0, m0, m, spatial_dims)] for m in measures}
    dead = [is_constant(m0, spatial_dims)]
    if bool(dead[0].any()):
        logger.warning(
            "cascading_randomization: the trained model's map is constant (dead) for %d of %d maps; the test is "
            "uninformative for them (similarity 0 against any non-constant randomised map)",
            int(dead[0].sum()),
            dead[0].numel(),
        )
    maps = [m0] if keep_maps else []
    steps = [0]
    checkpoints = _checkpoint_steps(len(layer_list), max_steps)
    for i, mi in _randomise_in_cascade(net, layer_list, fn, checkpoints, seed):
        steps.append(i)
        for m in measures:
            sims[m].append(map_similarity(m0, mi, m, spatial_dims))
        dead.append(is_constant(mi, spatial_dims))
        if keep_maps:
            maps.append(mi)
    return SanityResult(
        layers=layer_list,
        similarity={k: torch.stack(v) for k, v in sims.items()},
        constant=torch.stack(dead),
        maps=maps,
        steps=steps,
        frozen_targets=frozen,
    )


def _check_cascade_args(
    max_steps: int | None, measures: Sequence[str], targets: object, image: torch.Tensor | None
) -> None:
    if max_steps is not None and int(max_steps) < 1:
        raise MedcamError(f"max_steps must be >= 1 (or None for every layer), got {max_steps}")
    for m in measures:
        if m not in ("spearman", "pearson", "ssim"):
            raise MedcamError(f"unknown similarity measure {m!r}; use 'spearman', 'pearson' or 'ssim'")
    if (targets is None) != (image is None):
        raise MedcamError("freezing the targets needs both targets= and image= (the explained image [1, Cin, *S])")


def _freeze_map_fn(
    net: nn.Module,
    map_fn: Callable[..., torch.Tensor],
    targets: Target | Sequence[Target],
    image: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None,
) -> tuple[Callable[[nn.Module], torch.Tensor], list[Target]]:
    """The trained model's regions of ``targets`` on ``image`` (frozen), and ``map_fn`` bound to them."""
    with torch.no_grad():
        out = forward(net, image) if forward is not None else net(image)
    if not isinstance(out, torch.Tensor):
        raise MedcamError(f"the model returned {type(out).__name__}; pass forward= returning the output tensor")
    frozen = freeze_targets(targets, out)
    try:
        inspect.signature(map_fn).bind(net, frozen)
    except TypeError:
        raise MedcamError(
            "with targets= the map_fn is called as map_fn(model, frozen_targets): give it two arguments, e.g. "
            "lambda m, t: SegGradCAM(m, layer)(image, t)"
        ) from None
    except ValueError:  # no signature available (some builtins): call it and see
        pass
    return _bind_targets(map_fn, frozen), frozen


def _cascade_layers(
    net: nn.Module, fn: Callable[[nn.Module], torch.Tensor], model: nn.Module, layers: Sequence[str] | None
) -> tuple[list[str], torch.Tensor]:
    """The layers to randomise, output first (``layers`` checked, or every parametrised module map_fn runs, in
    reverse execution order), and the trained model's map (detached)."""
    names = dict(net.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in names]
        if missing:
            raise MedcamError(f"layers {missing} are not modules of the model; see medcam.list_layers(model)")
        layer_list = list(layers)
        order, m0, ran_original = _execution_order(net, fn, model)
        if not order:
            if ran_original:
                raise MedcamError(_no_model_run_message(net, ran_original))
            logger.warning(
                "cascading_randomization: map_fn(model) does not run the model it is given, so its maps cannot "
                "change (expected only for a model-independent baseline such as an edge detector)"
            )
    else:
        order, m0, ran_original = _execution_order(net, fn, model)
        layer_list = list(reversed(order))
        if not layer_list:
            raise MedcamError(_no_model_run_message(net, ran_original))
    if not isinstance(m0, torch.Tensor):
        raise MedcamError(f"map_fn must return a tensor, got {type(m0).__name__}")
    return layer_list, m0.detach()


def _checkpoint_steps(n: int, max_steps: int | None) -> set[int]:
    """The cascade steps (1..n) after which the map is computed: all, or ``max_steps`` evenly spaced with the last."""
    if max_steps is None or int(max_steps) >= n:
        return set(range(1, n + 1))
    return {max(1, round(j * n / int(max_steps))) for j in range(1, int(max_steps) + 1)}


def _randomise_in_cascade(
    net: nn.Module, layer_list: list[str], fn: Callable[[nn.Module], torch.Tensor], checkpoints: set[int], seed: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Re-initialise ``layer_list`` one after the other in ``net`` (kept: cascading), seeded, with the global RNG
    state restored afterwards; yields ``(step, map of the randomised net)`` at every checkpoint step."""
    names = dict(net.named_modules())
    cuda_devs = sorted({p.device.index or 0 for p in net.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devs):
        torch.manual_seed(seed)
        for i, name in enumerate(layer_list, 1):
            for sub in names[name].modules():
                if any(True for _ in sub.parameters(recurse=False)):
                    _reinit(sub)
            logger.debug("randomised %s", name)
            if i in checkpoints:
                yield i, fn(net).detach()
