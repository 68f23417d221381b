"""ResNet-18 slice classifier with four exits, as used by AME-CAM (Chen et al., MICCAI 2023).

The network is a ResNet-18 whose BatchNorm layers are replaced by InstanceNorm. After each of the four residual stages
(``layer1`` .. ``layer4``, strides 4, 8, 16, 32) an *exit* applies a 1x1 convolution to ONE channel, giving a map
``m_i`` ``[B, 1, H/s_i, W/s_i]``; the exit's logit is the global average of ``m_i``. Each exit is trained with
``BCEWithLogits`` on the slice label ("tumour" / "normal"); the total loss is ``sum_i lambda_i * BCE_i`` with
``lambda = (0.25, 0.5, 0.75, 1.0)`` from shallow to deep. The CAM of exit ``i`` is ``m_i`` itself, upsampled bilinearly
to the input size (no gradients needed).

Checked against the authors' public code (``windstormer/AME-CAM``: ``Res18_Classifier`` in ``models.py``, training in
``src/encoder_phase/cnet.py``), read, not copied: InstanceNorm without affine parameters (``nn.InstanceNorm2d``
defaults), exits ``Conv2d(c, 1, 1)``, loss weights ``(0.25, 0.5, 0.75, 1.0)``, Adam lr 1e-4 with weight decay 1e-5,
cosine annealing over the epochs to 5e-6, the checkpoint of the epoch with the best validation AUC (of the deepest
exit's sigmoid). Their optional first phase, SimCLR pre-training of the encoder, is :func:`pretrain_contrastive`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import MedcamError
from ..normalize import normalize

__all__ = ["ResNet18IN", "ExitLogit", "multi_exit_loss", "DEFAULT_EXIT_WEIGHTS", "exit_cams", "roc_auc"]

logger = logging.getLogger(__name__)

DEFAULT_EXIT_WEIGHTS: tuple[float, float, float, float] = (0.25, 0.5, 0.75, 1.0)


def _norm(ch: int) -> nn.Module:
    return nn.InstanceNorm2d(ch)  # affine=False, track_running_stats=False: the authors' norm_layer


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with InstanceNorm."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18IN(nn.Module):
    """ResNet-18 with InstanceNorm and four one-channel exits.

    Args:
        in_channels: input channels (1 for one MRI modality).
        width: channels of ``layer1`` (64 in the standard ResNet-18; stages use width x 1, 2, 4, 8).
        exit_weights: loss weights ``lambda_i`` of the four exits (shallow to deep).

    ``forward(x)`` with ``x`` ``[B, in_channels, H, W]`` returns the exit logits ``[B, 4]`` (column ``i`` = global
    average of map ``m_i``). :meth:`forward_maps` also returns the maps; :meth:`embed` returns the global-average
    pooled ``layer4`` features ``[B, 8*width]`` used as contrastive embeddings.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        exit_weights: Sequence[float] = DEFAULT_EXIT_WEIGHTS,
    ):
        super().__init__()
        if in_channels < 1 or width < 1:
            raise MedcamError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        if len(exit_weights) != 4:
            raise MedcamError(f"exit_weights needs 4 values (one per exit), got {len(exit_weights)}")
        self.in_channels, self.width = int(in_channels), int(width)
        self.exit_weights = tuple(float(w) for w in exit_weights)
        w = self.width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 7, 2, 3, bias=False), _norm(w), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        chans = [w, 2 * w, 4 * w, 8 * w]
        self.layer1 = nn.Sequential(_BasicBlock(w, chans[0], 1), _BasicBlock(chans[0], chans[0], 1))
        self.layer2 = nn.Sequential(_BasicBlock(chans[0], chans[1], 2), _BasicBlock(chans[1], chans[1], 1))
        self.layer3 = nn.Sequential(_BasicBlock(chans[1], chans[2], 2), _BasicBlock(chans[2], chans[2], 1))
        self.layer4 = nn.Sequential(_BasicBlock(chans[2], chans[3], 2), _BasicBlock(chans[3], chans[3], 1))
        self.exits = nn.ModuleList([nn.Conv2d(c, 1, 1) for c in chans])
        self.strides = (4, 8, 16, 32)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for ex in self.exits:  # small exits: initial logits near 0
            assert isinstance(ex, nn.Conv2d) and ex.bias is not None
            nn.init.normal_(ex.weight, std=0.01)
            nn.init.zeros_(ex.bias)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise MedcamError(f"ResNet18IN expects input [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 32:
            raise MedcamError(f"input slices must be at least 32x32 (stride 32), got {tuple(x.shape[-2:])}")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs ``[layer1, layer2, layer3, layer4]``, shapes ``[B, width*2^i, H/s_i, W/s_i]``."""
        self._check(x)
        h = self.stem(x)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = layer(h)
            feats.append(h)
        return feats

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Exit logits ``[B, 4]`` and the four exit maps ``m_i`` ``[B, 1, H/s_i, W/s_i]`` (raw, pre-sigmoid)."""
        maps = [ex(f) for ex, f in zip(self.exits, self.features(x))]
        logits = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)
        return logits, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exit logits ``[B, 4]`` for input ``[B, in_channels, H, W]``."""
        return self.forward_maps(x)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average pooled ``layer4`` features ``[B, 8*width]`` (non-negative: after ReLU)."""
        return self.features(x)[-1].mean(dim=(2, 3))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Multi-exit loss of this model (see :func:`multi_exit_loss`)."""
        return multi_exit_loss(logits, labels, self.exit_weights)


def multi_exit_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: Sequence[float] = DEFAULT_EXIT_WEIGHTS
) -> torch.Tensor:
    """``sum_i lambda_i * BCEWithLogits(logits[:, i], labels)``.

    Args:
        logits: exit logits ``[B, E]``.
        labels: slice labels ``[B]`` (0 normal / 1 tumour; float or int).
        weights: ``E`` loss weights.
    Returns:
        scalar tensor.
    """
    if logits.ndim != 2 or logits.shape[1] != len(weights):
        raise MedcamError(f"logits must be [B, {len(weights)}], got {tuple(logits.shape)}")
    labels = labels.reshape(-1).to(logits)
    if labels.shape[0] != logits.shape[0]:
        raise MedcamError(f"{labels.shape[0]} labels for a batch of {logits.shape[0]}")
    if ((labels != 0) & (labels != 1)).any():
        raise MedcamError("slice labels must be 0 (normal) or 1 (tumour)")
    total = logits.new_zeros(())
    for i, w in enumerate(weights):
        total = total + w * F.binary_cross_entropy_with_logits(logits[:, i], labels)
    return total


@torch.no_grad()
def exit_cams(model: ResNet18IN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four exit CAMs upsampled bilinearly to the input size, and the exit logits.

    The model is run in eval mode and its train/eval mode is restored afterwards.

    Args:
        model: a :class:`ResNet18IN`.
        x: slices ``[B, C, H, W]``.
    Returns:
        ``(maps [B, 4, H, W] float32 raw exit maps, logits [B, 4])``.
    """
    was_training = model.training
    model.eval()
    try:
        logits, maps = model.forward_maps(x)
    finally:
        model.train(was_training)
    up = [F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(up, dim=1).float(), logits.float()


class ExitLogit(nn.Module):
    """View of one exit's logit as a ``[B, 1]`` output (for Grad-CAM-family explainers of the classifier).

    Wraps (does not copy or modify) the model; ``index=-1`` is the deepest exit.
    """

    def __init__(self, model: ResNet18IN, index: int = -1):
        super().__init__()
        if not -4 <= index < 4:
            raise MedcamError(f"exit index must be in -4..3, got {index}")
        self.model = model
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit ``[B, 1]`` of the chosen exit."""
        idx = self.index % 4
        return self.model.forward(x)[:, idx : idx + 1]


def pretrain_contrastive(
    model: ResNet18IN,
    images: torch.Tensor,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    temperature: float = 0.2,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Optional self-supervised pre-training of the encoder (SimCLR-style NT-Xent on two random views).

    The paper pre-trains the encoder contrastively before classification; this is a light stand-in: views are random
    flips, 90-degree rotations, intensity scaling and Gaussian noise; the projection is the pooled ``layer4`` features.

    Args:
        model: the classifier (trained in place: this is the user's own training loop).
        images: slices ``[N, C, H, W]``.
    Returns:
        the loss of every step.
    """
    from .contrastive import nt_xent_loss

    if images.shape[0] < 2:
        raise MedcamError("contrastive pre-training needs at least 2 slices")
    dev = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def view(x: torch.Tensor) -> torch.Tensor:
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(-2, -1))
        scale = 0.8 + 0.4 * torch.rand((x.shape[0], 1, 1, 1), generator=g)
        return x * scale.to(x) + 0.03 * torch.randn(x.shape, generator=g).to(x)

    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(images.shape[0], generator=g)
        for s in range(0, len(perm) - 1, batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < 2:
                continue
            x = images[idx].to(dev)
            z1, z2 = model.embed(view(x)), model.embed(view(x))
            loss = nt_xent_loss(z1, z2, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


__all__.append("pretrain_contrastive")


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney statistic with average ranks for ties); NaN with one class only."""
    from scipy.stats import rankdata

    sc, lb = scores.detach().reshape(-1).double().cpu().numpy(), labels.reshape(-1).cpu().numpy() > 0.5
    n_pos, n_neg = int(lb.sum()), int((~lb).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(sc)
    return float((r[lb].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def _predict(model: ResNet18IN, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat(
        [model(images[s : s + batch_size].to(dev))[:, -1].cpu() for s in range(0, len(images), batch_size)]
    )


@dataclass
class _StepBudget:
    """The losses of all steps so far, the optional step limit and the logging cadence of one epoch."""

    losses: list[float]
    max_steps: int | None
    log_every: int
    epoch: int

    def exhausted(self) -> bool:
        return self.max_steps is not None and len(self.losses) >= self.max_steps

    def record(self, loss: float) -> None:
        self.losses.append(loss)
        if self.log_every and len(self.losses) % self.log_every == 0:
            logger.info("classifier epoch %d step %d loss %.4f", self.epoch, len(self.losses), loss)


def _train_epoch(
    model: ResNet18IN,
    images: torch.Tensor,
    labels: torch.Tensor,
    opt: torch.optim.Optimizer,
    g: torch.Generator,
    batch_size: int,
    augment: bool,
    steps: _StepBudget,
) -> None:
    """One shuffled pass over the slices (batches of one slice are skipped: InstanceNorm needs two)."""
    dev = next(model.parameters()).device
    model.train()
    perm = torch.randperm(images.shape[0], generator=g)
    for s in range(0, len(perm), batch_size):
        if steps.exhausted():
            break
        idx = perm[s : s + batch_size]
        if len(idx) < 2:
            continue
        x, y = images[idx].to(dev), labels[idx].to(dev).float()
        if augment:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.to(dev)[:, None, None, None], x.flip(-1), x)
            x = x * (0.9 + 0.2 * torch.rand((len(idx), 1, 1, 1), generator=g)).to(x)
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.record(float(loss.detach()))


def _validation_auc(
    model: ResNet18IN, val_images: torch.Tensor, val_labels: torch.Tensor, hist: dict, epoch: int
) -> float:
    """The deepest exit's validation AUC after an epoch (appended to ``hist["val_auc"]``)."""
    model.eval()
    auc = roc_auc(_predict(model, val_images, 64), val_labels)
    hist["val_auc"].append(auc)
    logger.info("classifier epoch %d: validation AUC %.4f", epoch, auc)
    return auc


def train_classifier(
    model: ResNet18IN,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    max_steps: int | None = None,
    augment: bool = False,
    generator: torch.Generator | None = None,
    log_every: int = 20,
    history: dict | None = None,
    progress: bool = False,
) -> list[float]:
    """Train the multi-exit classifier on slices with the authors' settings.

    Shuffled epochs over all slices, Adam (``lr`` 1e-4, ``weight_decay`` 1e-5), cosine annealing over ``epochs`` to
    5e-6. With a validation set, the weights of the epoch with the best validation AUC (deepest exit) are restored
    at the end (the authors' best-validation-AUC checkpoint).

    Args:
        model: a :class:`ResNet18IN` (trained in place; left in eval mode).
        images: ``[N, C, H, W]`` slices; labels: ``[N]`` 0/1.
        val_images, val_labels: optional validation slices for the checkpoint choice.
        max_steps: stop after this many optimiser steps in total (short CPU runs).
        augment: random horizontal flips and intensity scaling (off by default, as in the authors' code).
        history: if given, filled with ``{"val_auc": [...], "best_epoch": int, "best_val_auc": float}``.
    Returns:
        the loss of every step.
    """
    if images.ndim != 4 or labels.shape[0] != images.shape[0]:
        raise MedcamError(f"need images [N, C, H, W] and labels [N], got {tuple(images.shape)}, {tuple(labels.shape)}")
    if (val_images is None) != (val_labels is None):
        raise MedcamError("pass both val_images and val_labels, or neither")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n_pos = int((labels == 1).sum())
    if n_pos == 0 or n_pos == len(labels):
        logger.warning("training slices have a single class (%d tumour of %d)", n_pos, len(labels))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=min(5e-6, lr))
    losses: list[float] = []
    best: tuple[float, int, dict] | None = None
    hist: dict = {"val_auc": [], "best_epoch": None, "best_val_auc": None}
    for ep in tqdm(range(epochs), desc="AME-CAM classifier", disable=not progress):
        steps = _StepBudget(losses, max_steps, log_every, ep)
        _train_epoch(model, images, labels, opt, g, batch_size, augment, steps)
        sched.step()
        if val_images is not None and val_labels is not None:  # both or neither (checked above)
            auc = _validation_auc(model, val_images, val_labels, hist, ep)
            if best is None or (auc == auc and (best[0] != best[0] or auc > best[0])):
                best = (auc, ep, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if steps.exhausted():
            break
    if best is not None:
        model.load_state_dict(best[2])
        hist["best_val_auc"], hist["best_epoch"] = best[0], best[1]
    if history is not None:
        history.update(hist)
    model.eval()
    return losses


__all__.append("train_classifier")


@torch.no_grad()
def ame_cam_maps(
    model: ResNet18IN,
    images: torch.Tensor,
    aggregator: torch.nn.Module | None = None,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """All AME-CAM maps of a batch of slices, raw (CPU float32 outputs).

    Returns a dict with
      * ``"exits"``: raw exit maps ``[N, 4, H, W]`` (bilinearly upsampled),
      * ``"logits"``: exit logits ``[N, 4]``,
      * ``"me_cam"``: mean of the 4 raw exit maps ``[N, 1, H, W]`` (ME-CAM, no attention),
      * with an aggregator also ``"attentive"`` (the final map ``sum_k a_k m_k`` on the raw maps, ``[N, 1, H, W]``),
        ``"weights"`` ``[N, 4, H, W]`` and ``"ame_cam"``: mean of the 5 raw maps (4 exits + final map), as the authors
        return it.
    The maps are raw (network polarity: high = large tumour-logit contribution). The authors' evaluation normalises
    each with :func:`authors_minmax` and inverts it (``1 - map``) before the 0.5 threshold.
    """
    from .attention import ame_cam_from_maps

    dev = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"exits": [], "logits": [], "attentive": [], "weights": []}
    was_agg_training = aggregator.training if aggregator is not None else False
    if aggregator is not None:
        aggregator.eval()
    try:
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(dev)
            maps, logits = exit_cams(model, x)
            out["exits"].append(maps.cpu())
            out["logits"].append(logits.cpu())
            if aggregator is not None:
                att, w = aggregator(x, maps)
                out["attentive"].append(att.cpu())
                out["weights"].append(w.cpu())
    finally:
        if aggregator is not None:
            aggregator.train(was_agg_training)
    res = {k: torch.cat(v) for k, v in out.items() if v}
    res["me_cam"] = res["exits"].mean(dim=1, keepdim=True)
    if aggregator is not None:
        res["ame_cam"] = ame_cam_from_maps(res["exits"], res["attentive"])
    return res


def authors_minmax(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The authors' evaluation normalisation of each map ``[N, 1, *S]``: ``(m - min + eps) / (max - min + eps)``
    where ``max > min``; a constant map is left as it is."""
    return normalize(maps.float(), "minmax", 0.0, dims=tuple(range(1, maps.ndim)), offset=eps, constant="keep")


__all__ += ["ame_cam_maps", "authors_minmax"]
