"""One normaliser: medcam.normalize implements min-max / max normalisation; every former variant is a call of it
with its own options and still gives its exact former numbers (compared bit for bit with the literal formulas)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import textwrap

import numpy as np
import pytest
import torch

import medcam
from medcam.amecam.attention import authors_normalize, minmax_maps
from medcam.amecam.classifier import authors_minmax
from medcam.amecam.slices import minmax_volume
from medcam.errors import MedcamError
from medcam.metrics.thresholds import normalize_maps
from medcam.normalize import normalize

MEDCAM = pathlib.Path(medcam.__file__).parent


def _maps(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[3, 4, 5, 6, 2]: random maps of both signs and scales, a tied minimum (ReLU'd), a constant and an all-zero
    map, and a map whose range (1e-9) is below the defaults' eps."""
    g = torch.Generator().manual_seed(0)
    m = (
        torch.randn(3, 4, 5, 6, 2, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 30.0, 1e-3])[:, None, None, None, None]
    )
    m[0, 1] = m[0, 1].clamp_min(0)
    m[1, 2] = 7.25
    m[2, 3] = 0.0
    m[2, 0] = 4.0 + 1e-9 * torch.rand(5, 6, 2, generator=g, dtype=torch.float64)
    return m.to(dtype)


# ---- the former implementations, verbatim (the formulas each variant must keep) --------------------------------
def _old_normalize(maps, mode="minmax", eps=1e-12):
    flat = maps.flatten(2)
    mx = flat.amax(-1, keepdim=True)
    if mode == "minmax":
        mn = flat.amin(-1, keepdim=True)
        rng = mx - mn
        out = torch.where(
            rng > eps, (flat - mn) / torch.where(rng > eps, rng, torch.ones_like(rng)), torch.zeros_like(flat)
        )
    else:
        out = torch.where(mx > eps, flat / torch.where(mx > eps, mx, torch.ones_like(mx)), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def _old_minmax_maps(maps, eps=1e-8):
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    out = torch.where((hi - lo) > eps, out, torch.zeros_like(out))
    return out.reshape(maps.shape)


def _old_authors_normalize(maps, eps=1e-5):
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    return ((flat - lo + eps) / (hi - lo + eps)).reshape(maps.shape)


def _old_authors_minmax(maps, eps=1e-5):
    flat = maps.float().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return torch.where(hi > lo, (flat - lo + eps) / (hi - lo + eps), flat).reshape(maps.shape)


def _old_minmax_volume(volume):
    v = torch.as_tensor(volume).float()
    lo, hi = v.min(), v.max()
    if hi - lo <= 0:
        return torch.zeros_like(v)
    return (v - lo) / (hi - lo)


def _old_normalize_maps(maps, mode, spatial_dims, eps=1e-12):
    if mode is None:
        return maps.float()
    n = int(np.prod(maps.shape[maps.ndim - spatial_dims :]))
    return _old_normalize(maps.float().reshape(-1, 1, n), mode, eps).reshape(maps.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["minmax", "max"])
def test_canonical_normalize_keeps_its_numbers(dtype, mode):
    m = _maps(dtype)
    for eps in (1e-12, 1e-6, 0.0):
        out = normalize(m, mode, eps)
        assert out.dtype == dtype and out.shape == m.shape
        assert torch.equal(out, _old_normalize(m, mode, eps))
    assert torch.equal(medcam.normalize(m, mode), _old_normalize(m, mode))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_amecam_variants_keep_their_numbers(dtype):
    m = _maps(dtype)
    assert torch.equal(minmax_maps(m), _old_minmax_maps(m))
    assert torch.equal(minmax_maps(m, eps=1e-2), _old_minmax_maps(m, eps=1e-2))
    assert torch.equal(authors_normalize(m), _old_authors_normalize(m))
    assert torch.equal(authors_normalize(m, eps=1e-3), _old_authors_normalize(m, eps=1e-3))
    # the authors' formula gives exactly 1 on a constant map (eps / eps), and so does the call
    assert torch.equal(authors_normalize(m)[1, 2], torch.ones_like(m[1, 2]))
    # authors_minmax: one map per sample [N, 1, *S] (float32 out); a constant map is left as it is
    single = m.flatten(0, 1)[:, None]
    assert torch.equal(authors_minmax(single), _old_authors_minmax(single))
    assert torch.equal(authors_minmax(single)[6], single[6].float())  # the constant 7.25 map
    # the authors' formula written out for one map, against the call
    x = m[0, 0].double()
    literal = (x - x.min() + 1e-5) / (x.max() - x.min() + 1e-5)
    torch.testing.assert_close(authors_normalize(m.double())[0, 0], literal, rtol=0, atol=0)


def test_minmax_volume_keeps_its_numbers(caplog):
    m = _maps()
    for vol in (m[0, 0], m[0, 1].numpy(), m[1] * 3 - 2, m[2, 3]):
        assert torch.equal(minmax_volume(vol), _old_minmax_volume(vol))
        assert minmax_volume(vol).dtype == torch.float32
    with caplog.at_level("WARNING"):
        assert torch.equal(minmax_volume(torch.full((4, 5), 2.0)), torch.zeros(4, 5))
    assert "constant volume" in caplog.text
    with pytest.raises(MedcamError, match="NaN or inf"):
        minmax_volume(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["minmax", "max", None])
def test_normalize_maps_keeps_its_numbers(spatial_dims, mode):
    m = _maps()
    out = normalize_maps(m, mode, spatial_dims)
    assert torch.equal(out, _old_normalize_maps(m, mode, spatial_dims))
    assert torch.equal(normalize_maps(m[0, 0], mode, 3), _old_normalize_maps(m[0, 0], mode, 3))  # no lead dims


def test_normalize_options():
    m = _maps(torch.float64)
    # dims: one map per channel over (sample, spatial) = the canonical call on the moved tensor
    per_channel = normalize(m, dims=(0, 2, 3, 4))
    moved = m.movedim(1, 0).reshape(1, 4, -1)
    assert torch.equal(per_channel, normalize(moved).reshape(4, 3, 5, 6, 2).movedim(0, 1))
    # an int dim: min-max along that axis only (random lines of 2 values, none constant)
    x = m[1, :2]
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    assert torch.equal(normalize(x, dims=-1), (x - lo) / (hi - lo))
    assert torch.equal(normalize(x, dims=-1), normalize(x, dims=(3,)))
    # constant maps: zero / one / keep; the range threshold is inclusive
    for constant, want in (("zero", 0.0), ("one", 1.0), ("keep", 7.25)):
        out = normalize(m, constant=constant)
        assert torch.equal(out[1, 2], torch.full_like(m[1, 2], want))
        assert torch.equal(out[0, 0], _old_normalize(m, "minmax")[0, 0])  # varying maps unchanged by the option
    assert torch.equal(normalize(m, eps=1e-6)[2, 0], torch.zeros_like(m[2, 0]))  # range 1e-9 <= eps
    assert normalize(m, eps=0.0)[2, 0].amax() == 1.0
    # offset: (m - min + o) / (max - min + o)
    x = m[0, 1]
    torch.testing.assert_close(
        normalize(m, offset=0.5)[0, 1], (x - x.min() + 0.5) / (x.max() - x.min() + 0.5), rtol=0, atol=0
    )
    # NaN: a map holding NaN becomes `constant` (never NaN out), or an error with check_finite
    bad = m.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    assert torch.equal(normalize(bad)[0, 0], torch.zeros_like(m[0, 0]))
    assert torch.equal(normalize(bad)[1:], normalize(m)[1:])
    with pytest.raises(MedcamError, match="NaN or inf"):
        normalize(bad, check_finite=True)


def test_normalize_bad_arguments():
    m = _maps()
    with pytest.raises(MedcamError, match=r"\[B, K, \*spatial\]"):
        normalize(m[0, 0, 0])
    with pytest.raises(MedcamError, match="mode must be"):
        normalize(m, "zscore")
    with pytest.raises(MedcamError, match="constant must be"):
        normalize(m, constant="nan")
    with pytest.raises(MedcamError, match="offset applies to mode 'minmax' only"):
        normalize(m, "max", offset=1e-5)


def test_normalize_is_differentiable():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: normalize(t), (m,))
    assert torch.autograd.gradcheck(lambda t: normalize(t, offset=1e-2, constant="one"), (m,))
    assert torch.autograd.gradcheck(lambda t: normalize(t.abs() + 0.1, "max"), (m,))


# ---- structure: the formulas live in medcam/normalize.py only -----------------------------------------------------
#: the former normalisers; each must now be a thin call of medcam.normalize.normalize
FORMER_VARIANTS = {
    "medcam.amecam.attention.minmax_maps": minmax_maps,
    "medcam.amecam.attention.authors_normalize": authors_normalize,
    "medcam.amecam.classifier.authors_minmax": authors_minmax,
    "medcam.amecam.slices.minmax_volume": minmax_volume,
    "medcam.metrics.thresholds.normalize_maps": normalize_maps,
}
#: names of min/max reductions: a normaliser that calls one of them computes the range itself
_REDUCTIONS = {"min", "max", "amin", "amax", "aminmax", "clamp_min", "nanmin", "nanmax", "ptp"}
#: functions whose name says "norm"/"minmax" but that do something else (and why)
_NOT_MINMAX = {
    "medcam.mutual_information.normalized_mutual_information",  # NMI of a joint histogram
    "medcam.brats_layout._normalise_mapping",  # canonical modality names of a mapping
    "medcam.amecam.classifier._norm",  # an InstanceNorm layer
}


def _calls(fn_node: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(fn_node):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return names


def _functions():
    for path in sorted(MEDCAM.rglob("*.py")):
        module = ".".join(path.relative_to(MEDCAM.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield module, node


@pytest.mark.parametrize("qualname", sorted(FORMER_VARIANTS))
def test_former_variants_are_thin_calls_of_the_one_normaliser(qualname):
    fn = FORMER_VARIANTS[qualname]
    assert f"{fn.__module__}.{fn.__name__}" == qualname
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    calls = _calls(node)
    assert "normalize" in calls, f"{qualname} does not call medcam.normalize.normalize"
    assert not calls & _REDUCTIONS, f"{qualname} computes a min/max itself ({sorted(calls & _REDUCTIONS)})"
    assert inspect.getmodule(fn).normalize is normalize  # the name it calls is the one normaliser
    body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    assert len(body) <= 5, f"{qualname} is no longer a thin wrapper ({len(body)} statements)"


def test_no_other_normaliser_in_the_package():
    """Any function named like a normaliser outside normalize.py delegates to it (or is listed as no min-max)."""
    found = set()
    for module, node in _functions():
        name = node.name.lower()
        if module == "medcam.normalize" or not ("norm" in name or "minmax" in name or "min_max" in name):
            continue
        qualname = f"{module}.{node.name}"
        found.add(qualname)
        if qualname in _NOT_MINMAX:
            continue
        calls = _calls(node)
        assert "normalize" in calls and not calls & _REDUCTIONS, f"{qualname} implements a normalisation itself"
    assert set(FORMER_VARIANTS) <= found  # the scan sees the variants (it would miss nothing it is meant to catch)
    assert _NOT_MINMAX <= found, "stale entry in _NOT_MINMAX"
