"""The published study's wavelet decoder: predict Haar sub-bands, reconstruct by inverse DWT.

The image is built coarse-to-fine as in a multi-level 2D Haar synthesis (Mallat,
"A theory for multiresolution signal decomposition", TPAMI 1989): a low-pass LL
image at the feature resolution, then at each scale the three detail bands
LH/HL/HH, and one orthonormal inverse DWT doubles the resolution, until
``out_size``.

Data flow (``levels`` = the most doublings with h · 2^levels ≤ out_size, e.g. 14 → 4;
base = out_size / 2^levels, e.g. 14, or 28 for h = 24)::

    feats_nchw (N, C, h, w)   [bilinear-resized to base × base if h ≠ base]
      → trunk: Conv1×1 → width, then 2 × [Conv3×3, BN, ReLU]                    f at base
      → mean01 = sigmoid(Conv3×3(f) → 3)          local mean in [0, 1];  LL = 2^levels · mean01
      for each scale k (size s = base · 2^k, remaining levels r = levels − k):
          t = tanh(0.1 · Conv3×3(f) → 9)  → t_LH, t_HL, t_HH  each (N, 3, s, s) in (−1, 1)
          headroom = min(mean01, 1 − mean01)
          S        = |t_LH| + |t_HL| + |t_HH|;  shrink = tanh(S) / S
          band     = 2^r · headroom · shrink · t        (orthonormal Haar coefficients)
          mean01   = IDWT(2^r · mean01, LH, HL, HH) / 2^(r−1)                   size 2s
          f        = [bilinear ×2, Conv3×3, BN, ReLU](f)       (not after the last scale)
      → pixels01 = mean01  (N, 3, out_size, out_size)

Why this parametrisation is bounded: a child pixel of the IDWT is
``mean01 + headroom · shrink · (±t_LH ± t_HL ± t_HH)`` and
``|shrink · Σ ±t| ≤ tanh(S) < 1``, so every child stays strictly inside
[mean01 − headroom, mean01 + headroom] ⊂ [0, 1] at every scale.  The shrink is
smooth and ≈ 1 for small bands (a lone band keeps its full Tanh range), and
unlike a hard ``1 / max(1, S)`` it never parks a child on the boundary, where
its headroom (and gradient) would vanish.  No clamp is needed to bound the
output; the final ``clamp(0, 1)`` only absorbs float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featinv.decoders.registry import DECODERS
from featinv.errors import ParamsError

__all__ = ["haar_dwt", "haar_idwt", "WaveletDecoder"]

MIN_WIDTH = 64
MAX_WIDTH = 128
# Sides at or below this get MAX_WIDTH channels; wider grids get proportionally fewer.
FULL_WIDTH_SIDE = 28
# Band logits are scaled down before the Tanh: it starts the image as a smooth LL
# upsampling rather than noise, and keeps Adam's sign-sized steps on these wide
# 3×3 heads from slamming the Tanh into saturation, where band gradients vanish
# (without it a fixed batch stalls at lr 1e-2).
BAND_LOGIT_SCALE = 0.1
EPS = 1e-6


def haar_dwt(
    pixels_nchw: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2D Haar DWT.

    For each 2×2 block [[a, b], [c, d]]: LL = (a+b+c+d)/2, LH = (a+b−c−d)/2
    (top minus bottom: horizontal edges), HL = (a−b+c−d)/2 (left minus right:
    vertical edges), HH = (a−b−c+d)/2.

    Args:
        pixels_nchw: (N, C, H, W) with H and W even.

    Returns:
        (LL, LH, HL, HH), each (N, C, H/2, W/2).

    Raises:
        ParamsError: H or W is odd.
    """
    height, width = pixels_nchw.shape[-2:]
    if height % 2 or width % 2:
        raise ParamsError(f"haar_dwt needs even height and width; got {height}×{width}")
    a = pixels_nchw[..., 0::2, 0::2]
    b = pixels_nchw[..., 0::2, 1::2]
    c = pixels_nchw[..., 1::2, 0::2]
    d = pixels_nchw[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def haar_idwt(
    ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`haar_dwt` (the Haar matrix is symmetric and orthogonal).

    Args:
        ll, lh, hl, hh: sub-bands, each (N, C, h, w).

    Returns:
        (N, C, 2h, 2w).
    """
    a = (ll + lh + hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll - lh - hl + hh) / 2
    # pixel_shuffle reads channel c·4 + (2i + j) into block position (i, j).
    blocks = torch.stack([a, b, c, d], dim=2).flatten(1, 2)
    return F.pixel_shuffle(blocks, 2)


class WaveletDecoder(nn.Module):
    """Coarse-to-fine Haar synthesis with bounded band predictors.

    Args:
        in_shape: (C, h, w) of the input features.
        out_size: side of the square output; ``out_size / 2^levels`` must be an integer.

    Raises:
        ParamsError: non-positive sizes, or ``out_size`` not divisible by the
            power of two needed to reach it from ``h``.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_size: int = 224) -> None:
        super().__init__()
        channels, height, width = (int(v) for v in in_shape)
        if min(channels, height, width, int(out_size)) < 1:
            raise ParamsError(
                f"wavelet needs positive in_shape and out_size; "
                f"got in_shape {tuple(in_shape)}, out_size {out_size}"
            )
        self.levels = _levels(height, out_size)
        self.base_size = out_size >> self.levels
        widths = [_width_at(self.base_size << k) for k in range(max(self.levels, 1))]

        self.trunk = nn.Sequential(
            nn.Conv2d(channels, widths[0], 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            _conv_bn_relu(widths[0], widths[0]),
            _conv_bn_relu(widths[0], widths[0]),
        )
        self.ll_head = nn.Conv2d(widths[0], 3, 3, padding=1)
        # 9 = 3 detail bands (LH, HL, HH) × 3 colours.
        self.band_heads = nn.ModuleList(
            nn.Conv2d(widths[k], 9, 3, padding=1) for k in range(self.levels)
        )
        self.refiners = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                _conv_bn_relu(widths[k], widths[k + 1]),
            )
            for k in range(self.levels - 1)
        )

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        if tuple(feats_nchw.shape[-2:]) != (self.base_size, self.base_size):
            feats_nchw = F.interpolate(
                feats_nchw, size=(self.base_size, self.base_size),
                mode="bilinear", align_corners=False,
            )
        feats = self.trunk(feats_nchw)
        mean01 = torch.sigmoid(self.ll_head(feats))
        for k in range(self.levels):
            coeff_scale = 2.0 ** (self.levels - k)  # orthonormal LL = coeff_scale · mean01
            t = torch.tanh(BAND_LOGIT_SCALE * self.band_heads[k](feats))
            t_lh, t_hl, t_hh = t.unflatten(1, (3, 3)).unbind(dim=1)
            headroom = torch.minimum(mean01, 1.0 - mean01)
            extent = t_lh.abs() + t_hl.abs() + t_hh.abs()
            shrink = torch.tanh(extent) / extent.clamp(min=EPS)
            band_scale = coeff_scale * headroom * shrink
            pixels = haar_idwt(
                coeff_scale * mean01, band_scale * t_lh, band_scale * t_hl, band_scale * t_hh
            )
            mean01 = pixels / (coeff_scale / 2.0)
            if k < self.levels - 1:
                feats = self.refiners[k](feats)
        # Already in [0, 1] by construction; the clamp only absorbs float rounding.
        return mean01.clamp(0.0, 1.0)


def _levels(height: int, out_size: int) -> int:
    """Number of IDWT doublings: the most that keep ``height · 2^levels ≤ out_size``.

    Rounding down makes the base grid ``out_size / 2^levels`` no smaller than
    ``height``, so off-size features are resized up, never thrown away.
    """
    levels, size = 0, height
    while size * 2 <= out_size:
        size *= 2
        levels += 1
    if out_size % (1 << levels):
        raise ParamsError(
            f"wavelet needs out_size divisible by 2^{levels} to start from feature "
            f"height {height}; got out_size {out_size}"
        )
    return levels


def _width_at(side: int) -> int:
    """Channel width of the feature path at grid side ``side`` (fewer on big grids)."""
    return max(MIN_WIDTH, min(MAX_WIDTH, MAX_WIDTH * FULL_WIDTH_SIDE // side))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@DECODERS.register("wavelet")
def _wavelet(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return WaveletDecoder(in_shape, out_size)
