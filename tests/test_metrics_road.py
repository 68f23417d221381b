"""3D noisy linear imputation and the ROAD score."""

import pytest
import torch

from medcam.errors import MedcamError
from medcam.metrics import noisy_linear_imputation, road


def _linear_field(shape):
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    f = torch.stack([1 + 2 * z - 3 * y + 0.5 * x, -4 + 0.25 * z + y - 2 * x])
    return f


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_imputation_reproduces_linear_field_and_keeps_voxels(solver):
    f = _linear_field((9, 10, 11))
    rem = torch.rand(9, 10, 11, generator=torch.Generator().manual_seed(0)) < 0.6
    rem[0] = rem[-1] = False
    rem[:, 0] = rem[:, -1] = False
    rem[:, :, 0] = rem[:, :, -1] = False  # removed voxels have all 6 neighbours inside the volume
    out = noisy_linear_imputation(f, rem, noise=0.0, solver=solver)
    assert torch.allclose(out, f, atol=1e-4)
    assert torch.equal(out[:, ~rem], f[:, ~rem])


def test_imputation_hand_values_border_and_isolated():
    # 1-D line [0, ?, ?, 3]: linear interpolation
    out = noisy_linear_imputation(torch.tensor([[0.0, 9.0, 9.0, 3.0]]), torch.tensor([False, True, True, False]), 0.0)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    # 2-D 3x3, centre removed: mean of its 4 face neighbours
    img = torch.arange(9.0).reshape(1, 3, 3)
    img[0, 1, 1] = 100.0
    rem = torch.zeros(3, 3, dtype=torch.bool)
    rem[1, 1] = True
    out = noisy_linear_imputation(img, rem, 0.0)
    assert out[0, 1, 1].item() == pytest.approx((1 + 3 + 5 + 7) / 4)
    # border voxel: mean of the neighbours that exist
    rem = torch.zeros(3, 3, dtype=torch.bool)
    rem[0, 0] = True
    assert noisy_linear_imputation(img, rem, 0.0)[0, 0, 0].item() == pytest.approx((1 + 3) / 2)
    # everything removed: no boundary data -> kept mean, here nothing kept -> 0
    assert noisy_linear_imputation(img, torch.ones(3, 3, dtype=torch.bool), 0.0).abs().sum() == 0


def test_imputation_noise_only_on_removed_voxels():
    f = _linear_field((8, 8, 8))
    rem = torch.zeros(8, 8, 8, dtype=torch.bool)
    rem[2:6, 2:6, 2:6] = True
    clean = noisy_linear_imputation(f, rem, 0.0)
    noisy = noisy_linear_imputation(f, rem, 0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, ~rem], f[:, ~rem])
    resid = (noisy - clean)[:, rem]
    std = f.flatten(1).std(1)
    ratio = resid.std(1) / (0.05 * std)
    assert torch.all((ratio > 0.8) & (ratio < 1.2))


def test_road_hand_value():
    img = torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 5)
    sal = img[0].clone()
    r = road(img, sal, lambda x: x.flatten(1).sum(1), percentiles=(20, 40), noise=0.0)
    # MoRF removes the 5 (imputed 1) -> 5; LeRF removes trailing ones (imputed 1) -> 9
    assert r.score.item() == 9.0
    assert r.morf.tolist() == [[5.0, 5.0]]
    assert r.lerf.tolist() == [[9.0, 9.0]]
    assert r.combined.item() == pytest.approx(2.0)
    with pytest.raises(MedcamError, match="percentiles"):
        road(img, sal, lambda x: x.flatten(1).sum(1), percentiles=(0, 50))


def test_road_prefers_true_contribution_on_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    contrib = (xg.grad * x)[0, 0]
    rand = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(3))

    def fn(v):
        with torch.no_grad():
            return model(v).flatten(1).sum(1)

    r = road(x, torch.stack([contrib, rand]), fn, percentiles=(20, 50, 80), noise=0.0)
    assert r.combined[0] > r.combined[1]
