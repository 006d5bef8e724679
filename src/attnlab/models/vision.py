"""``VisionTransformer``: patches -> encoder with any registered mixer -> class logits."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from attnlab.models.blocks import BlockStack, ModelSizes
from attnlab.nn.short_conv import ShortConvLayers

__all__ = ["VisionTransformer"]


class VisionTransformer(ModelSizes, nn.Module):
    """ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929) with a swappable mixer.

    ``images [B, channels, image_size, image_size] -> logits [B, num_classes]``: non-overlapping
    ``patch_size`` patches, a linear patch embedding, learned positions, bidirectional pre-norm blocks,
    mean pooling over patches and a linear head.

    ``short_conv=K`` (odd; 0: none) puts a gated centred convolution over the patch sequence (raster
    order, so it reaches ``K // 2`` patches left and right along a row, across row ends) before the
    mixer of the blocks in ``short_conv_layers`` ("all", "first" or a tuple of indices), the same
    :class:`attnlab.nn.short_conv.ShortConvolution` whatever the mechanism.

    >>> vit = VisionTransformer(8, 2, 1, 10, dim=32, depth=2, heads=4)
    >>> vit(torch.randn(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(self, image_size: int, patch_size: int, channels: int, num_classes: int, *, dim: int = 64,
                 depth: int = 2, heads: int = 4, mechanism: str = "softmax", mlp_ratio: int = 4,
                 short_conv: int = 0, short_conv_layers: ShortConvLayers = "all",
                 **mechanism_options: Any) -> None:
        super().__init__()
        if patch_size <= 0 or image_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.num_patches = (image_size // patch_size) ** 2
        self.embed = nn.Linear(channels * patch_size * patch_size, dim)
        self.position = nn.Parameter(torch.randn(self.num_patches, dim) * 0.02)
        self.trunk = BlockStack(dim, depth, heads, mechanism=mechanism, causal=False, mlp_ratio=mlp_ratio,
                                seq_len=self.num_patches, short_conv=short_conv,
                                short_conv_layers=short_conv_layers, **mechanism_options)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        patches = rearrange(images, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch_size, q=self.patch_size)
        x = self.embed(patches) + self.position  # (B, P, dim)
        return self.head(self.trunk(x).mean(dim=1))  # (B, num_classes)
