"""The published study's attention decoder: a small pre-norm transformer over feature tokens.

Blocks are ViT's (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021):
pre-norm multi-head self-attention and MLP, each residual, with a learned
positional embedding; the token grid is then upsampled by convolutions.

Token reduction: full attention over a 112×112 map (12 544 tokens) is
infeasible, so a strided patch-embedding conv first cuts the grid to at most
``MAX_GRID``×``MAX_GRID`` (28×28 = 784 tokens): patch = ceil(h / 28), i.e. 4 for
112-inputs, 2 for 56, 1 (a 1×1 conv) for 28 and 14.  Each token keeps
``embed_dim`` = 192 channels: no squeeze for 1×1 patches of ≤ 192 channels,
a learned compression otherwise (a 4×4 patch of 64 channels is 1024 values).

Data flow::

    feats_nchw (N, C, h, w)  [zero-padded right/bottom to a multiple of the patch]
      → Conv(k=patch, s=patch) → (N, D, gh, gw) → tokens (N, gh·gw, D) + pos_embed
      → 4 × [x + MHSA(LN(x)); x + MLP(LN(x))]  → LN → (N, D, gh, gw)
      → ×2 blocks [bilinear ×2, Conv3×3, BN, ReLU], channels halving (min 32),
        while doubling stays ≤ out_size
      → bilinear resize to exactly out_size if out_size / grid is not a power of two
      → Conv3×3 → 3 → Sigmoid  ∈ [0, 1]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featinv.decoders.registry import DECODERS
from featinv.errors import ParamsError

__all__ = ["TransformerBlock", "AttentionDecoder"]

MAX_GRID = 28
EMBED_DIM = 192
DEPTH = 4
NUM_HEADS = 4
MLP_RATIO = 4.0
MIN_CHANNELS = 32


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``.

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = MLP_RATIO) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens_nld: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens_nld)
        tokens_nld = tokens_nld + self.attn(normed, normed, normed, need_weights=False)[0]
        return tokens_nld + self.mlp(self.norm2(tokens_nld))


class AttentionDecoder(nn.Module):
    """Patch-embed, 4 transformer blocks, conv upsampling to ``out_size``, Sigmoid.

    Args:
        in_shape: (C, h, w) of the input features.
        out_size: side of the square output.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.

    Raises:
        ParamsError: non-positive sizes, or ``num_heads`` not dividing ``embed_dim``.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_size: int = 224,
        embed_dim: int = EMBED_DIM,
        depth: int = DEPTH,
        num_heads: int = NUM_HEADS,
    ) -> None:
        super().__init__()
        channels, height, width = (int(v) for v in in_shape)
        if min(channels, height, width, int(out_size)) < 1:
            raise ParamsError(
                f"attention needs positive in_shape and out_size; "
                f"got in_shape {tuple(in_shape)}, out_size {out_size}"
            )
        if embed_dim % num_heads:
            raise ParamsError(
                f"attention needs num_heads to divide embed_dim; got {num_heads} and {embed_dim}"
            )
        self.out_size = out_size
        self.patch = max(math.ceil(height / MAX_GRID), math.ceil(width / MAX_GRID))
        self.grid_hw = (math.ceil(height / self.patch), math.ceil(width / self.patch))
        self.patch_embed = nn.Conv2d(channels, embed_dim, self.patch, stride=self.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_hw[0] * self.grid_hw[1], embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *(TransformerBlock(embed_dim, num_heads) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim)

        layers: list[nn.Module] = []
        ch, size = embed_dim, self.grid_hw[0]
        while size * 2 <= out_size:
            out_ch = max(ch // 2, MIN_CHANNELS)
            layers += [
                nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                nn.Conv2d(ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            ch, size = out_ch, size * 2
        self.upsample = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        height, width = feats_nchw.shape[-2:]
        pad_h = self.grid_hw[0] * self.patch - height
        pad_w = self.grid_hw[1] * self.patch - width
        if pad_h or pad_w:
            feats_nchw = F.pad(feats_nchw, (0, pad_w, 0, pad_h))
        grid_nchw = self.patch_embed(feats_nchw)
        n, dim, gh, gw = grid_nchw.shape
        tokens = grid_nchw.flatten(2).transpose(1, 2) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        x = self.upsample(tokens.transpose(1, 2).reshape(n, dim, gh, gw))
        if tuple(x.shape[-2:]) != (self.out_size, self.out_size):
            x = F.interpolate(
                x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False
            )
        return torch.sigmoid(self.to_rgb(x))


@DECODERS.register("attention")
def _attention(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return AttentionDecoder(in_shape, out_size)
