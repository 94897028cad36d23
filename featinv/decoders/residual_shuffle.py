"""featinv's own decoder: residual blocks at feature resolution + pixel-shuffle upsampling.

Data flow::

    feats (C, h, w) ─ conv3×3 → W ─┬─ [conv3×3 → ReLU → conv3×3 (+)] × K ─ conv3×3 ─(+)─┐
                                   └──────────────── global skip ─────────────────────┘
      → [conv3×3 → PixelShuffle(2), channels halving] × log2(224/h) → conv3×3 → 3 → +0.5 → clamp[0,1]

Why this shape: most of the work happens at the feature resolution, where the
tap's information lives, as in EDSR (Lim et al., "Enhanced Deep Residual
Networks for Single Image Super-Resolution", CVPRW 2017: no BatchNorm, a global
residual) and ESPCN (Shi et al., CVPR 2016: sub-pixel convolution instead of
transposed convolutions, which avoids their checkerboard artefacts).  It is
fully convolutional with a small receptive field, so it can be trained on
random feature crops (``train.feature_crop``) — many more samples per CPU
second — and applied to whole images.

The output is clamped to [0, 1] with a straight-through gradient: pixels that
overshoot still receive the loss's gradient, unlike with a saturating sigmoid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featinv.decoders.registry import DECODERS

__all__ = ["ResidualShuffleDecoder", "clamp01_ste"]

MIN_UP_CHANNELS = 32


def clamp01_ste(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] in the forward pass; identity gradient in the backward pass."""
    return x + (x.clamp(0.0, 1.0) - x).detach()


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x), inplace=True))


class ResidualShuffleDecoder(nn.Module):
    """EDSR-style decoder for feature inversion.

    Args:
        in_shape: (C, h, w) of the input features.
        out_size: side of the square output.
        width: channels of the residual trunk (default: 64, or 96 for inputs wider than 128 channels).
        blocks: residual blocks at the feature resolution.
    """

    fully_convolutional = True

    def __init__(self, in_shape: tuple[int, int, int], out_size: int = 224, width: int | None = None,
                 blocks: int = 6) -> None:
        super().__init__()
        channels, height, _ = in_shape
        width = width or (64 if channels <= 128 else 96)
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)],
                                  nn.Conv2d(width, width, 3, padding=1))
        ups: list[nn.Module] = []
        self.doublings = max(0, math.floor(math.log2(out_size / height) + 1e-9))
        up_width = width
        for _ in range(self.doublings):
            # Channels halve per doubling (min 32) so the full-resolution convs stay cheap.
            nxt = max(up_width // 2, MIN_UP_CHANNELS)
            ups += [nn.Conv2d(up_width, 4 * nxt, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(inplace=True)]
            up_width = nxt
        self.upsample = nn.Sequential(*ups)
        self.tail = nn.Conv2d(up_width, 3, 3, padding=1)
        self.scale = out_size / (height * 2**self.doublings)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        x = self.head(feats_nchw)
        x = x + self.body(x)
        x = self.upsample(x)
        if abs(self.scale - 1.0) > 1e-9:  # 224 / h not a power of two: finish with a resize
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return clamp01_ste(self.tail(x) + 0.5)


@DECODERS.register("residual_shuffle")
def _residual_shuffle(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return ResidualShuffleDecoder(in_shape, out_size)
