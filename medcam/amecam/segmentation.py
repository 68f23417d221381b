"""Multi-resolution aggregation of a segmentation network's CAMs (AME-CAM idea applied to segmentation networks).

:class:`AMECAM` computes the ROI map of a segmentation network at several layers (encoder and decoder, different
resolutions) with one medcam CAM method per layer, upsamples each to the image grid, min-max normalises each map per
sample and target (raw CAM magnitudes differ by orders of magnitude between layers), and aggregates them:

* ``aggregation="mean"``: the plain mean of the normalised layer maps (no training);
* ``aggregation="attention"``: a per-voxel softmax attention over layers (:class:`AttentionAggregator`), trained per
  model with :meth:`AMECAM.fit` on unlabelled volumes with the C2AM-style contrastive loss. Contrastive embeddings
  are the segmentation network's OWN frozen features at ``embed_layer`` (default: the bottleneck, ``layer="auto"``
  of the core engine), global-average pooled: ``f = x * M`` and ``b = x * (1 - M)`` are run through the network up to
  that layer (the forward stops there), ``E(.) = GAP(features)``.

Both outputs lie in [0, 1] (convex combinations of [0, 1] maps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import BaseSegCAM
from ..errors import LayerError, MedcamError
from ..hooks import StopForward, preserved_model_state
from ..layers import auto_layer, check_hookable, resolve_layer
from ..methods import SegHiResGradCAM
from ..targets import Target, as_target_list
from .attention import AttentionAggregator, fit_attention, minmax_maps

__all__ = ["AMECAM"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1


class AMECAM:
    """Aggregated multi-layer CAM of a segmentation network.

    Args:
        model: segmentation network ``[B, Cin, *S] -> [B, C, *S]`` (2D or 3D). Never modified (modes, flags and
            gradients are left as they were).
        layers: two or more layers (dotted names or modules) to explain, e.g. encoder and decoder stages.
        method: a medcam CAM class (:class:`medcam.SegHiResGradCAM`, ``SegGradCAM``, ...), one instance per layer.
        aggregation: ``"mean"`` or ``"attention"`` (needs :meth:`fit` or :meth:`load` first).
        inferer: optional MONAI ``SlidingWindowInferer``, passed to every per-layer method.
        embed_layer: layer whose pooled output embeds foreground/background for :meth:`fit` (default: the bottleneck
            found by the core engine's ``"auto"`` rule).
        hidden: hidden channels of the attention net (32 in the paper; smaller is cheaper in 3D).
        attention_downsample: integer factor; the attention net runs on an average-pooled grid and its weights are
            upsampled (linear interpolation keeps them summing to 1). 1 = full resolution.
        method_kwargs: extra keyword arguments for every per-layer method (e.g. ``amp=True``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str | nn.Module],
        method: type[BaseSegCAM] = SegHiResGradCAM,
        aggregation: Literal["mean", "attention"] = "attention",
        inferer: Any | None = None,
        embed_layer: str | nn.Module | None = None,
        hidden: int = 16,
        attention_downsample: int = 1,
        method_kwargs: dict | None = None,
    ):
        self.model = check_hookable(model)
        if isinstance(layers, (str, nn.Module)) or len(layers) < 2:
            raise MedcamError("AMECAM needs a list of at least two layers, e.g. layers=['model.1', 'model.2.1']")
        if aggregation not in ("mean", "attention"):
            raise MedcamError(f"aggregation must be 'mean' or 'attention', got {aggregation!r}")
        if not (isinstance(method, type) and issubclass(method, BaseSegCAM)):
            raise MedcamError(f"method must be a medcam CAM class such as medcam.SegHiResGradCAM, got {method!r}")
        if int(attention_downsample) < 1:
            raise MedcamError(f"attention_downsample must be a positive integer, got {attention_downsample}")
        if any(isinstance(name, str) and name == "auto" for name in layers):
            raise LayerError("AMECAM needs explicit layers (not 'auto'): see medcam.list_layers(model, example)")
        self.cams = [method(model, layer=name, inferer=inferer, **(method_kwargs or {})) for name in layers]
        self.layer_names = [c.layer_name for c in self.cams]
        if len(set(self.layer_names)) != len(self.layer_names):
            raise LayerError(f"duplicate layers: {self.layer_names}")
        self.method = method
        self.aggregation = aggregation
        self.inferer = inferer
        self.hidden = int(hidden)
        self.attention_downsample = int(attention_downsample)
        self.embed_layer_name: str | None = None
        if embed_layer is not None:
            self.embed_layer_name = resolve_layer(model, embed_layer)[0]
        self.aggregator: AttentionAggregator | None = None

    # ----------------------------------------------------------------------------------------------- maps ---
    @property
    def n_layers(self) -> int:
        return len(self.cams)

    def layer_maps(self, image: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Per-layer maps, ReLU'd, upsampled to the image grid and min-max normalised per sample/target/layer.

        Args:
            image: ``[B, Cin, *S]``.
            targets: K targets.
        Returns:
            float32 ``[B, K, L, *S]`` in [0, 1] (L = number of layers).
        """
        tl = as_target_list(targets)
        # each [B, K, *S]; an inferer may stitch on another device (inferer.device / cpu_thresh)
        maps = [cam(image, tl, relu=True, upsample=True).to(image.device) for cam in self.cams]
        return minmax_maps(torch.stack(maps, dim=2).flatten(1, 2)).reshape(
            maps[0].shape[0], len(tl), len(maps), *maps[0].shape[2:]
        )

    def _attend(self, image: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attentive map ``[B, 1, *S]`` and weights ``[B, L, *S]`` for ``image`` ``[B, C, *S]``, maps ``[B, L, *S]``."""
        assert self.aggregator is not None
        f = self.attention_downsample
        if f == 1:
            return self.aggregator(image, maps)
        pool = F.avg_pool2d if image.ndim == 4 else F.avg_pool3d
        small_w = self.aggregator.weights(pool(image, f, ceil_mode=True), pool(maps, f, ceil_mode=True))
        mode = "bilinear" if image.ndim == 4 else "trilinear"
        w = F.interpolate(small_w, size=image.shape[2:], mode=mode, align_corners=False)
        return (w * maps).sum(dim=1, keepdim=True), w

    def aggregate(self, image: torch.Tensor, layer_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Aggregate precomputed layer maps ``[B, K, L, *S]`` -> ``(maps [B, K, *S], weights [B, K, L, *S] | None)``."""
        if layer_maps.ndim != image.ndim + 1 or layer_maps.shape[2] != self.n_layers:
            raise MedcamError(
                f"layer maps must be [B, K, {self.n_layers}, *S] for image {tuple(image.shape)}, got "
                f"{tuple(layer_maps.shape)}"
            )
        if self.aggregation == "mean":
            return layer_maps.mean(dim=2), None
        if self.aggregator is None:
            raise MedcamError("aggregation='attention' needs a trained aggregator: call fit(...) or load(path) first")
        dev = next(self.aggregator.parameters()).device
        x = image.to(dev).float()
        outs, ws = [], []
        was_training = self.aggregator.training
        self.aggregator.eval()
        try:
            with torch.no_grad():
                for k in range(layer_maps.shape[1]):
                    att, w = self._attend(x, layer_maps[:, k].to(dev))
                    outs.append(att[:, 0])
                    ws.append(w)
        finally:
            self.aggregator.train(was_training)
        return torch.stack(outs, 1).to(image.device), torch.stack(ws, 1).to(image.device)

    def __call__(
        self, image: torch.Tensor, targets: Target | Sequence[Target], return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Aggregated maps ``[B, K, *S]`` (float32 in [0, 1]) for ``image`` ``[B, Cin, *S]`` and K targets.

        With ``return_weights=True`` also the per-voxel layer weights ``[B, K, L, *S]`` (None for "mean").
        """
        lm = self.layer_maps(image, targets)
        out, w = self.aggregate(image, lm)
        return (out, w) if return_weights else out

    # ---------------------------------------------------------------------------------------------- training ---
    def _embed_fn(self, example: torch.Tensor):
        """Frozen-encoder embedding ``[n, Cin, *S] -> [n, D]`` (GAP of ``embed_layer``'s output)."""
        if self.embed_layer_name is None:
            ex = example[:1]
            if self.inferer is not None:
                from monai.utils import fall_back_tuple

                roi = fall_back_tuple(self.inferer.roi_size, example.shape[2:])
                ex = torch.zeros((1, example.shape[1], *roi), dtype=example.dtype, device=example.device)
            self.embed_layer_name = auto_layer(self.model, ex)
            logger.info("AMECAM: contrastive embeddings from layer %r", self.embed_layer_name)
        module = resolve_layer(self.model, self.embed_layer_name)[1]
        model = self.model

        def embed(x: torch.Tensor) -> torch.Tensor:
            captured: list[torch.Tensor] = []

            def hook(_m, _i, out):
                captured.append(out if isinstance(out, torch.Tensor) else out[0])
                raise StopForward

            h = module.register_forward_hook(hook)
            try:
                model(x)
            except StopForward:
                pass
            finally:
                h.remove()
            if not captured:
                raise LayerError(f"embed layer {self.embed_layer_name!r} did not run in the forward pass")
            return captured[0].float().flatten(2).mean(-1)

        return embed

    def fit(
        self,
        volumes: Iterable[torch.Tensor],
        targets: Target | Sequence[Target],
        epochs: int = 10,
        lr: float = 1e-3,
        batch_size: int = 2,
        device: torch.device | str | None = None,
        seed: int = 0,
        layer_maps: Sequence[torch.Tensor] | None = None,
    ) -> list[float]:
        """Train the attention aggregator on unlabelled volumes (the network stays frozen and unchanged).

        Every (volume, target) pair is one training sample: its layer maps are computed once, then the aggregator is
        trained for ``epochs`` with the contrastive loss (see the module docstring).

        Args:
            volumes: iterable of images ``[Cin, *S]`` or ``[B, Cin, *S]`` (all with the same spatial size if
                ``batch_size > 1``).
            targets: the targets whose maps are aggregated.
            batch_size: samples per step (>= 2 so that the SimMax terms act).
            device: where the aggregator trains (default: the model's device).
            layer_maps: optional precomputed :meth:`layer_maps` outputs ``[B, K, L, *S]``, one per volume, to
                avoid computing them again.
        Returns:
            the loss of every step.
        """
        if self.aggregation != "attention":
            raise MedcamError("fit() trains the attention aggregator; this AMECAM uses aggregation='mean'")
        tl = as_target_list(targets)
        dev = torch.device(device) if device is not None else next(self.model.parameters()).device
        images, maps = [], []
        volumes = list(volumes)
        if layer_maps is not None and len(layer_maps) != len(volumes):
            raise MedcamError(f"{len(layer_maps)} layer-map tensors for {len(volumes)} volumes")
        for j, v in enumerate(volumes):
            if not isinstance(v, torch.Tensor):
                raise MedcamError(f"volumes must be tensors [Cin, *S] or [B, Cin, *S], got {type(v).__name__}")
            nd = self._model_spatial_dims()
            if nd is None:
                if v.ndim < 4:
                    raise MedcamError("cannot tell the spatial dims of the model: pass volumes as [B, Cin, *S]")
            elif v.ndim == nd + 1:
                v = v[None]
            elif v.ndim != nd + 2:
                raise MedcamError(
                    f"volumes must be [Cin, *S] or [B, Cin, *S] with {nd} spatial dims, got {tuple(v.shape)}"
                )
            lm = (self.layer_maps(v.to(dev), tl) if layer_maps is None else layer_maps[j]).cpu()  # [B, K, L, *S]
            if lm.shape[:3] != (v.shape[0], len(tl), self.n_layers) or lm.shape[3:] != v.shape[2:]:
                raise MedcamError(f"layer maps {tuple(lm.shape)} do not match volume {tuple(v.shape)} and targets")
            for b in range(v.shape[0]):
                for k in range(len(tl)):
                    images.append(v[b].float().cpu())
                    maps.append(lm[b, k])
        if not images:
            raise MedcamError("fit() got no volumes")
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) > 1 and batch_size > 1:
            raise MedcamError(f"volumes have different shapes {sorted(shapes)}: crop/resample them or use batch_size=1")
        x, m = torch.stack(images), torch.stack(maps)
        if self.aggregator is None:
            self.aggregator = AttentionAggregator(
                n_maps=self.n_layers, image_channels=x.shape[1], spatial_dims=x.ndim - 2, hidden=self.hidden
            )
        elif self.aggregator.image_channels != x.shape[1] or self.aggregator.spatial_dims != x.ndim - 2:
            raise MedcamError("the existing aggregator was built for other images (channels / dims)")
        self.aggregator.to(dev)
        embed = self._embed_fn(x[:1].to(dev))
        # freeze the network for the embedding passes (modes and flags restored afterwards)
        with preserved_model_state(self.model):
            losses = fit_attention(
                self.aggregator,
                x,
                m,
                embed,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
                attend=self._attend,
            )
        return losses

    def _model_spatial_dims(self) -> int | None:
        """Spatial dims of the model's inputs, from its first convolution (None if it has none)."""
        for m in self.model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                return m.weight.ndim - 2
        return None

    # ------------------------------------------------------------------------------------------- save / load ---
    def save(self, path: str | os.PathLike) -> None:
        """Save the trained aggregator with the layer names, method and settings it was trained for."""
        if self.aggregator is None:
            raise MedcamError("nothing to save: the attention aggregator is not trained (call fit first)")
        torch.save(
            {
                "format_version": _FORMAT_VERSION,
                "layers": list(self.layer_names),
                "method": self.method.__name__,
                "embed_layer": self.embed_layer_name,
                "attention_downsample": self.attention_downsample,
                "config": self.aggregator.config(),
                "state_dict": {k: v.detach().cpu() for k, v in self.aggregator.state_dict().items()},
            },
            path,
        )

    def load(self, path: str | os.PathLike, strict: bool = True) -> AMECAM:
        """Load an aggregator saved by :meth:`save` (layer names and method must match unless ``strict=False``)."""
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format_version") != _FORMAT_VERSION:
            raise MedcamError(f"{path} is not an AMECAM aggregator file (format {_FORMAT_VERSION})")
        if ck["layers"] != list(self.layer_names) or ck["method"] != self.method.__name__:
            msg = (
                f"aggregator was trained for layers {ck['layers']} with {ck['method']}, this AMECAM uses "
                f"{self.layer_names} with {self.method.__name__}"
            )
            if strict:
                raise MedcamError(msg)
            logger.warning(msg)
        self.aggregator = AttentionAggregator(**ck["config"])
        self.aggregator.load_state_dict(ck["state_dict"])
        self.aggregator.eval()
        self.attention_downsample = int(ck["attention_downsample"])
        self.embed_layer_name = ck["embed_layer"]
        self.hidden = self.aggregator.hidden
        try:
            self.aggregator.to(next(self.model.parameters()).device)
        except StopIteration:
            pass
        return self
