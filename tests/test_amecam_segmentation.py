"""Tests of medcam.amecam.AMECAM: multi-layer CAM aggregation for segmentation networks (3D, tiny inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet

import medcam
from medcam import targets
from medcam.amecam import AMECAM
from medcam.errors import LayerError, MedcamError

LAYERS = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2"]


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


@pytest.fixture(scope="module")
def volumes() -> torch.Tensor:
    """Four tiny 2-channel volumes [4, 2, 16, 16, 16] with a bright blob each."""
    g = torch.Generator().manual_seed(0)
    x = 0.2 * torch.rand(4, 2, 16, 16, 16, generator=g)
    for i in range(4):
        c = 4 + 2 * i
        x[i, :, c : c + 5, 5:10, 4:9] += 0.8
    return x


@pytest.fixture(scope="module")
def fitted(net, volumes):
    am = AMECAM(net, LAYERS, aggregation="attention", hidden=4)
    losses = am.fit(list(volumes), [targets.ClassROI(1)], epochs=8, lr=1e-2, batch_size=4)
    return am, losses


def test_mean_aggregation_is_mean_of_normalised_layer_maps(net, volumes):
    am = AMECAM(net, LAYERS, aggregation="mean")
    tl = [targets.ClassROI(1), targets.ClassROI(0)]
    maps = am(volumes[:2], tl)
    assert maps.shape == (2, 2, 16, 16, 16)
    lm = am.layer_maps(volumes[:2], tl)
    assert lm.shape == (2, 2, 4, 16, 16, 16)
    # each layer map is the engine's map, min-max normalised
    single = medcam.SegHiResGradCAM(net, layer=LAYERS[1])(volumes[:2], tl)
    torch.testing.assert_close(lm[:, :, 1], medcam.normalize(single, mode="minmax"), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps, lm.mean(2))
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def test_identical_layer_maps_aggregate_to_that_map(net, volumes, fitted):
    am, _ = fitted
    m = torch.rand(2, 1, 1, 16, 16, 16).expand(2, 1, 4, 16, 16, 16)
    out_att, w = am.aggregate(volumes[:2], m)
    torch.testing.assert_close(out_att, m[:, :, 0], atol=1e-5, rtol=1e-5)
    mean = AMECAM(net, LAYERS, aggregation="mean")
    out_mean, w_none = mean.aggregate(volumes[:2], m)
    assert w_none is None
    torch.testing.assert_close(out_mean, m[:, :, 0])


def test_attention_weights_sum_to_one_per_voxel(fitted, volumes):
    am, _ = fitted
    maps, w = am(volumes[:2], [targets.ClassROI(1), targets.ClassROI(0)], return_weights=True)
    assert w.shape == (2, 2, 4, 16, 16, 16)
    torch.testing.assert_close(w.sum(2), torch.ones(2, 2, 16, 16, 16), atol=1e-5, rtol=1e-5)
    assert float(w.min()) >= 0.0
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 + 1e-6


def test_contrastive_fit_loss_decreases_and_model_untouched(net, fitted):
    _, losses = fitted
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < losses[0]
    assert net.training  # the fixture net is in train mode and stays there
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_save_load_reproduces_maps(net, volumes, fitted, tmp_path):
    am, _ = fitted
    tl = [targets.ClassROI(1)]
    ref = am(volumes[2:], tl)
    am.save(tmp_path / "agg.pt")
    loaded = AMECAM(net, LAYERS, aggregation="attention").load(tmp_path / "agg.pt")
    torch.testing.assert_close(loaded(volumes[2:], tl), ref, atol=0, rtol=0)
    with pytest.raises(MedcamError):
        AMECAM(net, LAYERS[:3]).load(tmp_path / "agg.pt")


def test_attention_downsample_weights_sum_to_one(net, volumes):
    am = AMECAM(net, LAYERS[:2], aggregation="attention", hidden=4, attention_downsample=2)
    am.fit(list(volumes[:2]), [targets.ClassROI(1)], epochs=1, batch_size=2)
    _, w = am(volumes[:1], [targets.ClassROI(1)], return_weights=True)
    torch.testing.assert_close(w.sum(2), torch.ones(1, 1, 16, 16, 16), atol=1e-5, rtol=1e-5)


def test_sliding_window_whole_volume_window_matches_direct(net, volumes):
    tl = [targets.ClassROI(1)]
    direct = AMECAM(net, LAYERS, aggregation="mean")(volumes[:1], tl)
    sw = AMECAM(net, LAYERS, aggregation="mean", inferer=SlidingWindowInferer((16, 16, 16), sw_batch_size=1))
    torch.testing.assert_close(sw(volumes[:1], tl), direct, atol=1e-4, rtol=1e-3)
    tiled = AMECAM(net, LAYERS, aggregation="mean", inferer=SlidingWindowInferer((8, 8, 8), overlap=0.5))
    out = tiled(volumes[:1], tl)
    assert out.shape == (1, 1, 16, 16, 16) and torch.isfinite(out).all()


def test_bad_input_errors(net):
    with pytest.raises(MedcamError):
        AMECAM(net, ["model.0"])
    with pytest.raises(MedcamError):
        AMECAM(net, LAYERS, aggregation="median")
    with pytest.raises(LayerError):
        AMECAM(net, ["model.0", "model.nope"])
    with pytest.raises(MedcamError, match="fit"):
        AMECAM(net, LAYERS)(torch.rand(1, 2, 16, 16, 16), [targets.ClassROI(1)])
    with pytest.raises(MedcamError):
        AMECAM(net, LAYERS, aggregation="mean").fit([torch.rand(2, 16, 16, 16)], [targets.ClassROI(1)])
