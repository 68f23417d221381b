"""Localisation metrics and thresholds against hand-computed values, skimage/numpy and MONAI."""

import math

import numpy as np
import pytest
import torch

from medcam.errors import MedcamError
from medcam.metrics import (
    dice_score,
    energy_pointing_game,
    hausdorff95,
    iou_score,
    localisation_scores,
    normalize_maps,
    otsu_threshold,
    percentile_threshold,
    pointing_game,
    threshold_maps,
    threshold_sweep,
    volume_diagonal_mm,
)


def test_energy_pointing_game_hand_value():
    m = torch.zeros(1, 2, 2, 3)
    m[0, 0, 0, :] = torch.tensor([1.0, 2.0, 3.0])
    m[0, 1, 1, 2] = 4.0
    g = torch.zeros(1, 2, 2, 3, dtype=torch.bool)
    g[0, 0, 0, 1:] = True  # holds 2 + 3
    e = energy_pointing_game(m, g)
    assert e.shape == (1,)
    assert e.item() == pytest.approx(5.0 / 10.0)


def test_energy_pointing_game_batched_and_empty_conventions():
    maps = torch.rand(2, 3, 4, 4, 4)
    maps[1, 2] = 0.0  # all-zero map -> NaN
    g = torch.zeros(2, 1, 4, 4, 4)
    g[0, 0, :2] = 1
    g[1, 0, 1:3] = 1
    e = energy_pointing_game(maps, g)
    assert e.shape == (2, 3)
    expect = (maps[0, 1, :2].sum() / maps[0, 1].sum()).item()
    assert e[0, 1].item() == pytest.approx(expect, rel=1e-6)
    assert math.isnan(e[1, 2].item())
    assert math.isnan(energy_pointing_game(maps[:1], torch.zeros(1, 1, 4, 4, 4))[0, 0].item())
    with pytest.raises(MedcamError, match="non-negative"):
        energy_pointing_game(maps - 1, g)


def test_pointing_game_with_tolerance_in_mm():
    m = torch.zeros(1, 9, 9, 9)
    m[0, 4, 4, 8] = 1.0  # max at x = 8
    g = torch.zeros(1, 9, 9, 9, dtype=torch.bool)
    g[0, 4, 4, 5] = True  # 3 voxels away along x
    assert pointing_game(m, g).item() == 0.0
    assert pointing_game(m, g, tolerance_mm=3.0).item() == 1.0
    # spacing 2 mm along x: distance is 6 mm
    assert pointing_game(m, g, tolerance_mm=5.0, spacing=(1, 1, 2)).item() == 0.0
    assert pointing_game(m, g, tolerance_mm=6.0, spacing=(1, 1, 2)).item() == 1.0
    assert math.isnan(pointing_game(m, torch.zeros_like(g)).item())
    assert pointing_game(torch.ones(1, 9, 9, 9), g).item() == 0.0  # constant map: no maximum to point with
    with pytest.raises(MedcamError, match="spacing"):
        pointing_game(m, g, tolerance_mm=1.0, spacing=(1, 1))


def test_dice_iou_hand_values_and_empty_sets():
    p = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    g = torch.zeros_like(p)
    p[..., 0, 0, :3] = True  # 3 voxels
    g[..., 0, 0, 1:4] = True  # 3 voxels, 2 shared
    assert dice_score(p, g).item() == pytest.approx(4 / 6)
    assert iou_score(p, g).item() == pytest.approx(2 / 4)
    e = torch.zeros_like(p)
    assert dice_score(e, e).item() == 1.0 and iou_score(e, e).item() == 1.0
    assert dice_score(p, e).item() == 0.0 and iou_score(e, g).item() == 0.0


def test_hd95_hand_value_and_spacing():
    p = torch.zeros(1, 1, 5, 5, 12, dtype=torch.bool)
    g = torch.zeros_like(p)
    p[..., 2, 2, 1] = True
    g[..., 2, 2, 5] = True
    assert hausdorff95(p, g).item() == pytest.approx(4.0)
    assert hausdorff95(p, g, spacing=(1.0, 1.0, 2.5)).item() == pytest.approx(10.0)


def test_hd95_matches_monai_and_empty_conventions():
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.random((3, 1, 10, 11, 12)) > 0.7)
    g = torch.from_numpy(rng.random((3, 1, 10, 11, 12)) > 0.6)
    sp = (1.0, 2.0, 0.5)
    ours = hausdorff95(p, g, spacing=sp)
    ref = compute_hausdorff_distance(p.float(), g.float(), include_background=True, percentile=95, spacing=list(sp))
    assert torch.allclose(ours, ref.reshape(3, 1).float(), atol=1e-5)
    e = torch.zeros(1, 10, 11, 12, dtype=torch.bool)
    assert hausdorff95(e, e).item() == 0.0
    diag = volume_diagonal_mm((10, 11, 12), sp)
    assert diag == pytest.approx(math.sqrt(10**2 + 22**2 + 6**2))
    assert hausdorff95(p[0], e, spacing=sp).item() == pytest.approx(diag, rel=1e-6)
    assert hausdorff95(p[0], e, empty_value=99.0).item() == 99.0
    assert volume_diagonal_mm((240, 240, 155)) == pytest.approx(373.13, abs=0.01)


def _blob(rng, shape, n):
    """A few random boxes: realistic masks whose two directed distance sets differ."""
    m = np.zeros(shape, dtype=bool)
    for _ in range(n):
        lo = [int(rng.integers(0, s - 3)) for s in shape]
        hi = [lo_ + int(rng.integers(2, 6)) for lo_ in lo]
        m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.mark.parametrize("spacing", [None, (1.0, 2.0, 0.5)])
def test_hd95_pooled_matches_medpy_and_monai_convention_is_the_max(spacing):
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(1)
    shape = (14, 15, 16)
    preds = [_blob(rng, shape, 3) for _ in range(4)] + [rng.random(shape) > 0.8]
    refs = [_blob(rng, shape, 2) for _ in range(4)] + [rng.random(shape) > 0.7]
    p = torch.from_numpy(np.stack(preds))
    g = torch.from_numpy(np.stack(refs))
    pooled = hausdorff95(p, g, spacing=spacing, convention="pooled")
    monai = hausdorff95(p, g, spacing=spacing, convention="monai")
    ref_pooled = [medpy_binary.hd95(a, b, voxelspacing=spacing) for a, b in zip(preds, refs)]
    assert np.allclose(pooled.numpy(), ref_pooled, atol=1e-4)
    ref_monai = compute_hausdorff_distance(
        p[:, None].float(),
        g[:, None].float(),
        include_background=True,
        percentile=95,
        spacing=list(spacing or (1,) * 3),
    )
    assert torch.allclose(monai, ref_monai.reshape(-1).float(), atol=1e-4)
    # the two conventions differ on these masks, and pooling never exceeds the larger directed percentile
    assert (monai - pooled).abs().max() > 0.1
    assert bool((pooled <= monai + 1e-5).all())


def test_hd95_convention_named_in_outputs():
    maps = torch.zeros(1, 1, 8, 8, 8)
    maps[..., 1:4, 1:4, 1:4] = 1.0
    g = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    g[..., 2:6, 2:6, 2:7] = True
    mon = localisation_scores(maps, g, method="value", value=0.5)
    poo = localisation_scores(maps, g, method="value", value=0.5, hd95_convention="pooled")
    assert "hd95_monai_mm" in mon and "hd95_pooled_mm" not in mon and "hd95_mm" not in mon
    assert "hd95_pooled_mm" in poo and "hd95_monai_mm" not in poo
    assert poo["hd95_pooled_mm"].item() == pytest.approx(hausdorff95(maps > 0.5, g, convention="pooled").item())
    sw = threshold_sweep(maps, g, thresholds=[0.5], hd95=True, hd95_convention="pooled")
    assert sw["hd95_pooled_mm"].reshape(-1)[0].item() == pytest.approx(poo["hd95_pooled_mm"].item())
    with pytest.raises(MedcamError, match="hd95_convention"):
        hausdorff95(maps > 0, g, convention="medpy")


def test_percentile_matches_numpy_and_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.8, 0.1, 200)]).reshape(2, 5, 5, 10)
    t = torch.from_numpy(a)
    for q in (0, 17.5, 50, 90, 100):
        got = percentile_threshold(t, q)
        exp = np.percentile(a.reshape(2, -1), q, axis=1)
        assert np.allclose(got.numpy(), exp, atol=1e-6)
    got = otsu_threshold(t)
    exp = [threshold_otsu(a[i]) for i in range(2)]
    assert np.allclose(got.numpy(), exp, atol=1e-5)
    assert otsu_threshold(torch.full((1, 3, 3, 3), 2.0)).item() == 2.0


def test_threshold_maps_and_normalize():
    m = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).reshape(1, 5, 1, 1)
    n = normalize_maps(m, "minmax")
    assert torch.allclose(n.flatten(), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(normalize_maps(m + 4, "max").flatten(), (m + 4).flatten() / 8)
    assert torch.equal(normalize_maps(torch.ones(1, 2, 2, 2)), torch.zeros(1, 2, 2, 2))
    assert threshold_maps(n, "value", 0.5).flatten().tolist() == [False, False, False, True, True]
    # 60th percentile of 0..4 is 2.4 -> keeps 3 and 4
    assert threshold_maps(m, "percentile", 60).flatten().tolist() == [False, False, False, True, True]
    with pytest.raises(MedcamError, match="value="):
        threshold_maps(m, "value")
    with pytest.raises(MedcamError, match="otsu"):
        threshold_maps(m, "bogus", 1)


def test_localisation_scores_and_sweep():
    maps = torch.zeros(1, 1, 6, 6, 6)
    maps[..., 1:3, 1:3, 1:3] = 1.0  # 8 voxels
    maps[..., 4, 4, 4] = 0.3
    g = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    g[..., 1:3, 1:3, 1:4] = True  # 12 voxels, contains the 8
    s = localisation_scores(maps, g, method="value", value=0.5)
    assert s["dice"].item() == pytest.approx(2 * 8 / (8 + 12))
    assert s["iou"].item() == pytest.approx(8 / 12)
    assert s["energy_pointing_game"].item() == pytest.approx(8 / 8.3)
    assert s["pointing_game"].item() == 1.0
    assert s["hd95_monai_mm"].item() == pytest.approx(1.0)
    sw = threshold_sweep(maps, g, thresholds=[0.0, 0.2, 0.5])
    assert sw["dice"].shape == (3, 1, 1)
    assert sw["dice"][0].item() == pytest.approx(2 * 8 / (9 + 12))  # t = 0 keeps the 0.3 voxel too
    assert sw["dice"][2].item() == pytest.approx(0.8)
    with pytest.raises(MedcamError, match="resample"):
        localisation_scores(maps, torch.zeros(1, 1, 5, 6, 6))
