"""Multi-resolution aggregation of a segmentation network's CAMs (AME-CAM applied to segmentation networks).

:class:`AMECAM` computes the ROI map of a segmentation network at several layers (encoder and decoder, different
resolutions) with one medcam CAM method per layer (through the explainer's inferer: a MONAI sliding window works
window by window), upsamples each to the image grid and min-max normalises it per sample and target (raw CAM
magnitudes differ by orders of magnitude between layers; these normalised layer maps play the role of the authors'
raw exit maps). Then:

* ``aggregation="mean"``: the plain mean of the layer maps (ME-CAM, no training);
* ``aggregation="attention"``: the authors' aggregator (:class:`AttentionAggregator`: input ``grey * normalize(m_k)``,
  bias-free convs + BatchNorm + ReLU, softmax over the layers), final map ``F = sum_k a_k m_k``, returned map = mean of
  the ``L`` layer maps and ``F`` (the authors' AME-CAM). :meth:`AMECAM.fit` trains it per model.

What the aggregator is trained to do (:meth:`AMECAM.fit`): nothing about the target or the labels. It picks, voxel by
voxel, a convex combination of the layer maps such that, over the samples of a batch, the grey image masked by the
final map (``g * F``, "foreground") and by its complement (``g * (1 - F)``, "background") are similar among
foregrounds, similar among backgrounds and dissimilar between the two, cosine similarity of the flattened masked
voxels (the authors' pixel-space C2AM loss, :mod:`.contrastive`). Whether that makes the map follow the target is an
empirical question (see notebook 05). ``embedding="features"`` is an ablation that embeds ``x * minmax(F)`` with the
network's own frozen features at ``embed_layer`` (global-average pooled, window by window through the inferer).

Outputs lie in [0, 1] (means of convex combinations of [0, 1] maps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import BaseSegCAM
from ..errors import LayerError, MedcamError
from ..hooks import StopForward, preserved_model_state, run_model
from ..layers import auto_layer, check_hookable, resolve_layer
from ..methods import SegHiResGradCAM
from ..sliding import WindowGrid, window_example
from ..targets import Target, as_target_list
from .attention import AttentionAggregator, ame_cam_from_maps, fit_attention, minmax_maps

__all__ = ["AMECAM"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 2  # 2: the authors' aggregator (bias-free convs, BatchNorm after the last conv)


class AMECAM:
    """Aggregated multi-layer CAM of a segmentation network.

    Args:
        model: segmentation network ``[B, Cin, *S] -> [B, C, *S]`` (2D or 3D). Never modified (modes, flags and
            gradients are left as they were).
        layers: two or more layers (dotted names or modules) to explain, e.g. encoder and decoder stages.
        method: a medcam CAM class (:class:`medcam.SegHiResGradCAM`, ``SegGradCAM``, ...), one instance per layer.
        aggregation: ``"mean"`` or ``"attention"`` (needs :meth:`fit` or :meth:`load` first).
        inferer: optional MONAI ``SlidingWindowInferer``, passed to every per-layer method.
        embed_layer: for ``fit(..., embedding="features")`` only: layer whose pooled output embeds
            foreground/background (default: the bottleneck found by the core engine's ``"auto"`` rule).
        hidden: hidden channels of the attention net (32 in the authors' code; smaller is cheaper in 3D).
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
        hidden: int = 32,
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

    def aggregate(
        self, image: torch.Tensor, layer_maps: torch.Tensor, output: Literal["ame_cam", "final"] = "ame_cam"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Aggregate precomputed layer maps ``[B, K, L, *S]`` -> ``(maps [B, K, *S], weights [B, K, L, *S] | None)``.

        For ``"attention"``, ``output="ame_cam"`` gives the authors' AME-CAM (mean of the ``L`` layer maps and the final
        map ``sum_l a_l m_l``), ``output="final"`` the final map alone.
        """
        if output not in ("ame_cam", "final"):
            raise MedcamError(f"output must be 'ame_cam' or 'final', got {output!r}")
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
                    m = layer_maps[:, k].to(dev).float()
                    att, w = self._attend(x, m)
                    outs.append((ame_cam_from_maps(m, att) if output == "ame_cam" else att)[:, 0])
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
    def _embed_fn(self, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Frozen-network embedding ``[n, Cin, *S] -> [n, D]`` (GAP of ``embed_layer``'s output).

        With an inferer that has a ``roi_size`` (MONAI ``SlidingWindowInferer``) the network only ever sees windows of
        that size: the image is zero-padded to at least the window, cut into the inferer's windows (its overlap) and
        the embedding is the mean over windows of each window's pooled features. Without an inferer the network runs
        on the whole image.
        """
        windows = self.inferer is not None and getattr(self.inferer, "roi_size", None) is not None
        if self.embed_layer_name is None:
            # the core engine's "auto" rule, at the size the network sees (one window of the inferer's grid)
            ex = window_example(self.inferer, example) if windows else example[:1]
            self.embed_layer_name = auto_layer(self.model, ex)
            logger.info("AMECAM: contrastive embeddings from layer %r", self.embed_layer_name)
        module = resolve_layer(self.model, self.embed_layer_name)[1]
        model = self.model

        def pooled(x: torch.Tensor) -> torch.Tensor:
            # not ActivationHook/ModelRunner.activations: those detach, and the features ablation trains the
            # aggregator through the frozen network (gradient w.r.t. x * minmax(F))
            captured: list[torch.Tensor] = []

            def hook(_m, _i, out):
                captured.append(out if isinstance(out, torch.Tensor) else out[0])
                raise StopForward

            h = module.register_forward_hook(hook)
            try:
                run_model(model, x)
            except StopForward:
                pass
            finally:
                h.remove()
            if not captured:
                raise LayerError(f"embed layer {self.embed_layer_name!r} did not run in the forward pass")
            return captured[0].float().flatten(2).mean(-1)

        if not windows:
            return pooled
        sw_batch = int(getattr(self.inferer, "sw_batch_size", 1) or 1)

        def embed(x: torch.Tensor) -> torch.Tensor:
            # the sliding executor's grid: MONAI's symmetric zero padding up to the window, its windows and overlap
            grid = WindowGrid(self.inferer, tuple(x.shape[2:]), x.device)
            xp = grid.pad_zeros(x)
            acc = None
            for s0 in range(0, len(grid.slices), sw_batch):
                chunk = grid.slices[s0 : s0 + sw_batch]
                win = torch.cat([xp[(slice(None), slice(None), *sl)] for sl in chunk])  # [len(chunk) * n, C, *roi]
                e = pooled(win).reshape(len(chunk), x.shape[0], -1).sum(0)
                acc = e if acc is None else acc + e
            assert acc is not None
            return acc / len(grid.slices)

        return embed

    def fit(
        self,
        volumes: Iterable[torch.Tensor],
        targets: Target | Sequence[Target],
        epochs: int = 10,
        lr: float = 1e-4,
        batch_size: int = 2,
        device: torch.device | str | None = None,
        seed: int = 0,
        layer_maps: Sequence[torch.Tensor] | None = None,
        embedding: Literal["pixels", "features"] = "pixels",
        weight_decay: float = 1e-5,
        progress: bool = False,
    ) -> list[float]:
        """Train the attention aggregator on unlabelled volumes (the network stays frozen and unchanged).

        The aggregator learns per-voxel layer weights whose final map splits each image into a foreground and a
        background that are consistent across the batch and unlike each other (see the module docstring); no label
        or reference mask is used. Every (volume, target) pair is one training sample: its layer maps are computed
        once, through the explainer's inferer (window by window with a sliding window), then the aggregator is
        trained for ``epochs`` with the authors' optimiser (Adam, ``lr`` 1e-4, ``weight_decay`` 1e-5, cosine schedule).

        Args:
            volumes: iterable of images ``[Cin, *S]`` or ``[B, Cin, *S]`` (all with the same spatial size if
                ``batch_size > 1``).
            targets: the targets whose maps are aggregated.
            batch_size: samples per step (>= 2 so that the SimMax terms compare samples).
            device: where the aggregator trains (default: the model's device).
            layer_maps: optional precomputed :meth:`layer_maps` outputs ``[B, K, L, *S]``, one per volume, to
                avoid computing them again.
            embedding: ``"pixels"`` (default, the authors': flattened masked grey voxels, the network is not run) or
                ``"features"`` (ablation: the network's pooled features at ``embed_layer``, through the inferer's
                windows).
            progress: show a progress bar over epochs.
        Returns:
            the loss of every step.
        """
        if self.aggregation != "attention":
            raise MedcamError("fit() trains the attention aggregator; this AMECAM uses aggregation='mean'")
        if embedding not in ("pixels", "features"):
            raise MedcamError(f"embedding must be 'pixels' or 'features', got {embedding!r}")
        tl = as_target_list(targets)
        dev = torch.device(device) if device is not None else next(self.model.parameters()).device
        volumes = list(volumes)
        if layer_maps is not None and len(layer_maps) != len(volumes):
            raise MedcamError(f"{len(layer_maps)} layer-map tensors for {len(volumes)} volumes")
        prepared = self._fit_volumes(volumes, batch_size)
        x, m = self._training_samples(prepared, tl, dev, layer_maps)
        aggregator = self._ensure_aggregator(spatial_dims=x.ndim - 2).to(dev)
        embed: Callable[[torch.Tensor], torch.Tensor] | Literal["pixels"] = "pixels"
        if embedding == "features":
            embed = self._embed_fn(x[:1].to(dev))
        # freeze the network for any embedding passes (modes and flags restored afterwards)
        with preserved_model_state(self.model):
            losses = fit_attention(
                aggregator,
                x,
                m,
                embed,
                epochs=epochs,
                lr=lr,
                weight_decay=weight_decay,
                batch_size=batch_size,
                generator=torch.Generator().manual_seed(seed),
                attend=self._attend,
                progress=progress,
            )
        return losses

    def _fit_volumes(self, volumes: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
        """Every volume as ``[B, Cin, *S]``, checked before any expensive work (shapes must agree to batch them)."""
        nd = self._model_spatial_dims()
        prepared = []
        for v in volumes:
            if not isinstance(v, torch.Tensor):
                raise MedcamError(f"volumes must be tensors [Cin, *S] or [B, Cin, *S], got {type(v).__name__}")
            if nd is None:
                if v.ndim < 4:
                    raise MedcamError("cannot tell the spatial dims of the model: pass volumes as [B, Cin, *S]")
            elif v.ndim == nd + 1:
                v = v[None]
            elif v.ndim != nd + 2:
                raise MedcamError(
                    f"volumes must be [Cin, *S] or [B, Cin, *S] with {nd} spatial dims, got {tuple(v.shape)}"
                )
            prepared.append(v)
        if not prepared:
            raise MedcamError("fit() got no volumes")
        shapes = {tuple(v.shape[1:]) for v in prepared}
        if len(shapes) > 1 and batch_size > 1:
            raise MedcamError(f"volumes have different shapes {sorted(shapes)}: crop/resample them or use batch_size=1")
        return prepared

    def _training_samples(
        self,
        prepared: list[torch.Tensor],
        tl: list[Target],
        dev: torch.device,
        layer_maps: Sequence[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample per (volume, target): images ``[N, Cin, *S]`` and their layer maps ``[N, L, *S]`` (CPU)."""
        images, maps = [], []
        for j, v in enumerate(prepared):
            lm = (self.layer_maps(v.to(dev), tl) if layer_maps is None else layer_maps[j]).cpu()  # [B, K, L, *S]
            if lm.shape[:3] != (v.shape[0], len(tl), self.n_layers) or lm.shape[3:] != v.shape[2:]:
                raise MedcamError(f"layer maps {tuple(lm.shape)} do not match volume {tuple(v.shape)} and targets")
            for b in range(v.shape[0]):
                for k in range(len(tl)):
                    images.append(v[b].float().cpu())
                    maps.append(lm[b, k])
        return torch.stack(images), torch.stack(maps)

    def _ensure_aggregator(self, spatial_dims: int) -> AttentionAggregator:
        """The attention aggregator, built on first use; an existing one must match the images' spatial dims."""
        if self.aggregator is None:
            self.aggregator = AttentionAggregator(n_maps=self.n_layers, spatial_dims=spatial_dims, hidden=self.hidden)
        elif self.aggregator.spatial_dims != spatial_dims:
            raise MedcamError("the existing aggregator was built for images with other spatial dims")
        return self.aggregator

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
