"""Small networks and an independent plain-autograd reference for the CAM tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHeadNet(nn.Module):
    """Feature extractor -> hooked layer ``feat`` -> 1x1 conv head (``y_c = sum_k w_ck A_k + b_c``)."""

    def __init__(self, spatial_dims: int = 3, cin: int = 2, k: int = 5, cout: int = 3, stride: int = 2):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.enc = nn.Sequential(conv(cin, 6, 3, padding=1), nn.ReLU(), conv(6, k, 3, stride=stride, padding=1))
        self.feat = nn.Identity()
        self.head = conv(k, cout, 1)

    def forward(self, x):
        return self.head(self.feat(self.enc(x)))


class GapLinearNet(nn.Module):
    """Conv features ``feat`` -> global average pooling -> linear classifier: output ``[B, C]``."""

    def __init__(self, cin: int = 2, k: int = 6, cout: int = 3):
        super().__init__()
        self.feat = nn.Sequential(nn.Conv3d(cin, k, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(k, cout)

    def forward(self, x):
        a = self.feat(x)
        return self.fc(a.mean(dim=(2, 3, 4)))


def autograd_reference(model: nn.Module, layer: nn.Module, x: torch.Tensor, weights_fn):
    """Plain autograd, no medcam code: activation A and dS/dA with ``S = sum(W * y)``.

    ``weights_fn(y_detached) -> W``. Uses a copy of the model with grad on, so the model under test is untouched.
    """
    store = {}

    def hook(m, i, o):
        store["a"] = o

    h = layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.enable_grad():
            y = model(x)
            w = weights_fn(y.detach())
            s = (w * y).sum()
            (g,) = torch.autograd.grad(s, store["a"])
    finally:
        h.remove()
    return store["a"].detach(), g.detach(), y.detach()


def reference_maps(a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """The formulas of cam-reference.md written out directly on ``A``, ``g`` ``[B, K, *f]`` (pre-ReLU, feature grid)."""
    dims = tuple(range(2, a.ndim))
    n = 1
    for d in a.shape[2:]:
        n *= d
    exp = (...,) + (None,) * len(dims)
    gradcam = ((g.sum(dims) / n)[exp] * a).sum(1)
    hires = (g * a).sum(1)
    xgrad = (((g * a).sum(dims) / (a.sum(dims) + 1e-7))[exp] * a).sum(1)
    layercam = (F.relu(g) * a).sum(1)
    sa = a.sum(dims)[exp]
    den = 2 * g**2 + sa * g**3
    aa = torch.where(den != 0, g**2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g))
    pp = ((aa * F.relu(g)).sum(dims)[exp] * a).sum(1)
    return {"gradcam": gradcam, "hirescam": hires, "xgradcam": xgrad, "layercam": layercam, "gradcam++": pp}
