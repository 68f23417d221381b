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
    with pytest.raises(MedcamError, match="embedding"):
        AMECAM(net, LAYERS).fit([torch.rand(2, 16, 16, 16)], [targets.ClassROI(1)], embedding="encoder")
    with pytest.raises(MedcamError, match="spatial dims"):  # checked before any layer map is computed
        AMECAM(net, LAYERS).fit([torch.rand(2, 16, 16, 16), torch.rand(16, 16)], [targets.ClassROI(1)])


def test_attention_output_is_mean_of_layer_maps_and_final_map(fitted, volumes):
    """The authors' AME-CAM: mean of the L layer maps and the final map sum_l a_l m_l (softmax weights, raw maps)."""
    am, _ = fitted
    tl = [targets.ClassROI(1)]
    lm = am.layer_maps(volumes[:2], tl)
    ame, w = am.aggregate(volumes[:2], lm)
    final, w2 = am.aggregate(volumes[:2], lm, output="final")
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(final, (w * lm).sum(2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ame, (lm.sum(2) + final) / (lm.shape[2] + 1), atol=1e-6, rtol=1e-5)
    with pytest.raises(MedcamError):
        am.aggregate(volumes[:2], lm, output="max")


UNETR_LAYERS = ["decoder5", "decoder4", "decoder2"]


@pytest.fixture(scope="module")
def unetr_case():
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(2, 2, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=2)
    g = torch.Generator().manual_seed(1)
    x = 0.2 * torch.rand(2, 2, 48, 48, 48, generator=g)
    x[0, :, 10:22, 12:24, 14:26] += 0.8
    x[1, :, 24:36, 20:32, 16:28] += 0.8
    inf = SlidingWindowInferer((32, 32, 32), overlap=0.25, sw_batch_size=2)
    return net, x, inf


def test_unetr_fit_runs_window_by_window(unetr_case):
    """UNETR takes only 32^3 inputs; fit on 48^3 volumes must go through the sliding window (it used to run the
    network on the whole volume: raw RuntimeError)."""
    net, x, inf = unetr_case
    with pytest.raises(RuntimeError):
        net(x[:1])  # the network itself cannot take the whole volume
    tl = [targets.ClassROI(1)]
    am = AMECAM(net, UNETR_LAYERS, inferer=inf, hidden=4)
    losses = am.fit(list(x), tl, epochs=2, batch_size=2)  # default: the authors' pixel-space loss
    assert len(losses) == 2 and all(np.isfinite(losses))
    maps, w = am(x, tl, return_weights=True)
    assert maps.shape == (2, 1, 48, 48, 48) and w.shape == (2, 1, 3, 48, 48, 48)
    torch.testing.assert_close(w.sum(2), torch.ones(2, 1, 48, 48, 48), atol=1e-5, rtol=1e-5)
    # feature-space ablation: embeddings through the inferer's windows too
    am_f = AMECAM(net, UNETR_LAYERS, inferer=inf, hidden=4, embed_layer="decoder5")
    lf = am_f.fit(
        list(x),
        tl,
        epochs=1,
        batch_size=2,
        embedding="features",
        layer_maps=[am.layer_maps(x, tl)[i : i + 1] for i in range(2)],
    )
    assert len(lf) == 1 and np.isfinite(lf[0])
    assert net.training and all(p.grad is None and p.requires_grad for p in net.parameters())


def test_feature_embedding_is_mean_over_inferer_windows(unetr_case):
    """Independent reference: run the network on each window of the inferer's grid (48 = windows at 0 and 16 per axis
    for roi 32, overlap 0.25) and average the pooled decoder5 features."""
    net, x, inf = unetr_case
    am = AMECAM(net, UNETR_LAYERS, inferer=inf, hidden=4, embed_layer="decoder5")
    embed = am._embed_fn(x[:1])
    net.eval()
    with torch.no_grad():
        got = embed(x)
        feats = []
        h = net.decoder5.register_forward_hook(lambda _m, _i, out: feats.append(out.flatten(2).mean(-1)))
        try:
            for a in (0, 16):
                for b in (0, 16):
                    for c in (0, 16):
                        net(x[:, :, a : a + 32, b : b + 32, c : c + 32])
        finally:
            h.remove()
    net.train()
    torch.testing.assert_close(got, torch.stack(feats).mean(0), atol=1e-5, rtol=1e-5)
