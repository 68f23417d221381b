"""Transformer layers: turn a token sequence into a feature map so that the CAM formulas apply unchanged.

A ViT block (UNETR's ``vit.blocks.N``) outputs tokens ``[B, N, C]``, one per input patch. Reshaping them onto the
patch grid gives ``[B, C, *grid]``; the same reshape is applied to the gradient, so every formula (a sum over
positions and channels) is the one of a convolutional layer on that grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import LayerError

__all__ = ["TokenGrid"]


class TokenGrid:
    """``reshape_transform`` for ViT tokens: ``[B, N, C]`` -> ``[B, C, *grid]``, ``grid = input size // patch``.

    Args:
        patch_size: the patch embedding's patch size (int or one per spatial dim), e.g. 16 for MONAI's UNETR.
        prefix_tokens: tokens before the patch tokens (1 for a classification token), dropped.

    Tokens are taken in the patch embedding's order (C order over the grid), as MONAI's ``UNETR.proj_feat`` does.

    Which layer: hook a normalisation's *output* (UNETR: ``vit.norm``, the tokens its decoder reads), not the block
    before it. A LayerNorm is scale invariant, so ``sum_c g_c A_c`` over its input is zero per token: gradient x
    activation maps (HiResCAM, XGrad-CAM) vanish there (measured on UNETR: map sum 7e-6 at ``vit.blocks.11``
    against 0.6 at ``vit.norm``).
    """

    def __init__(self, patch_size: int | Sequence[int], prefix_tokens: int = 0):
        self.patch_size = patch_size
        self.prefix_tokens = int(prefix_tokens)

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        p = (self.patch_size,) * len(spatial) if isinstance(self.patch_size, int) else tuple(self.patch_size)
        if len(p) != len(spatial):
            raise LayerError(
                f"patch_size {self.patch_size} does not match the {len(spatial)} spatial dims of the input"
            )
        return tuple(s // q for s, q in zip(spatial, p))

    def __call__(self, tokens: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """``tokens`` ``[B, N, C]`` of an input with spatial size ``spatial`` -> ``[B, C, *grid]``."""
        grid = self.grid(spatial)
        if tokens.ndim != 3:
            raise LayerError(f"TokenGrid expects tokens [B, N, C], got shape {tuple(tokens.shape)}")
        body = tokens[:, self.prefix_tokens :]
        if body.shape[1] != math.prod(grid):
            raise LayerError(
                f"the layer gives {tokens.shape[1]} tokens, but an input of size {tuple(spatial)} with patch size "
                f"{self.patch_size} makes a {grid} grid of {math.prod(grid)} patches"
                f"{f' after {self.prefix_tokens} prefix tokens' if self.prefix_tokens else ''}; "
                "set TokenGrid(patch_size=..., prefix_tokens=...) to the model's"
            )
        return body.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def __repr__(self) -> str:
        return f"TokenGrid(patch_size={self.patch_size}, prefix_tokens={self.prefix_tokens})"
