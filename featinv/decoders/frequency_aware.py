"""The published study's frequency-aware decoder.

Attention blocks follow CBAM (Woo et al., "CBAM: Convolutional Block Attention
Module", ECCV 2018): channel attention in the squeeze-and-excitation style (Hu et
al., CVPR 2018, here with CBAM's avg+max pooling), then spatial attention.  The
low/high split is in the spirit of Octave Convolution (Chen et al., ICCV 2019):
the low branch sees a low-pass copy of the features, the high branch the residual.

Data flow::

    feats_nchw (N, C, h, w)
      → 2 × CBAM [channel SE → spatial attention]
      → low  = blur(x)      → Conv3×3 → C/2, BN, ReLU     blur = avg-pool ×2 → bilinear back
        high = x − blur(x)  → Conv3×3 → C/2, BN, ReLU     so the split really is by frequency
      → concat (C) → channel SE → spatial attention          (fusion)
      → residual ×2 up-blocks, channels halving (min 64), while doubling stays ≤ out_size;
        bilinear resize to exactly out_size when out_size / h is not a power of two
        (e.g. 24 → 48 → 96 → 192 → resize 224)
      → multi-scale refinement  x + ReLU(BN(conv3×3(x) + conv3×3_dilation2(x)))
      → Conv3×3 → 3 → per-channel colour scale + bias → (tanh + 1) / 2  ∈ [0, 1]

Cost notes: the low branch convolves at the pooled resolution and is upsampled
afterwards (bilinear upsampling and convolution nearly commute; 4× cheaper), and
up-blocks that produce the full-resolution map are capped at 64 channels, so
112×112 inputs do not run 128-channel convolutions at 224×224.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featinv.decoders.registry import DECODERS
from featinv.errors import ParamsError

__all__ = [
    "ChannelAttention",
    "SpatialAttention",
    "CBAM",
    "ResidualUpBlock",
    "MultiScaleRefinement",
    "FrequencyAwareDecoder",
]

MIN_CHANNELS = 64
# Width of the up-block that produces the output-resolution map; keeps CPU cost moderate.
FULL_RES_CHANNELS = 64
SE_REDUCTION = 16
SE_MIN_HIDDEN = 8
SPATIAL_KERNEL = 7


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel gate with CBAM's avg+max pooling.

    Args:
        channels: channels of the gated map.
        reduction: bottleneck ratio of the shared MLP.
    """

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        hidden = max(channels // reduction, SE_MIN_HIDDEN)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(feats_nchw, 1))
        # A reduction, not F.adaptive_max_pool2d(·, 1): on CUDA with channels_last input that
        # kernel took a quarter of this decoder's training step (BENCHMARKS.md, "GPU figures, run 4").
        peak = self.mlp(feats_nchw.amax(dim=(2, 3), keepdim=True))
        return feats_nchw * torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """CBAM spatial gate: a 7×7 conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = SPATIAL_KERNEL) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat(
            [feats_nchw.mean(dim=1, keepdim=True), feats_nchw.amax(dim=1, keepdim=True)], dim=1
        )
        return feats_nchw * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Sequential):
    """Channel attention then spatial attention (CBAM's sequential order)."""

    def __init__(self, channels: int) -> None:
        super().__init__(ChannelAttention(channels), SpatialAttention())


class ResidualUpBlock(nn.Module):
    """×2 upsampling block with a residual path.

    Body: Conv3×3 (at the input resolution) → BN → ReLU → bilinear ×2 → Conv3×3 → BN;
    skip: Conv1×1 → bilinear ×2; output ReLU(body + skip).  The first conv runs
    before upsampling so only one conv pays for the larger grid.

    Args:
        in_channels: channels in.
        out_channels: channels out.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.post = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        body = self.post(_up2(self.pre(feats_nchw)))
        return F.relu(body + _up2(self.skip(feats_nchw)))


class MultiScaleRefinement(nn.Module):
    """Parallel 3×3 and dilated (5×5 receptive field) convs, summed, added back.

    The 5×5 receptive field comes from a 3×3 kernel with dilation 2: 9 taps
    instead of 25 at the full output resolution.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv5 = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        mixed = self.norm(self.conv3(feats_nchw) + self.conv5(feats_nchw))
        return feats_nchw + F.relu(mixed)


class FrequencyAwareDecoder(nn.Module):
    """Attention, frequency split, progressive residual upsampling, refinement, colour.

    Args:
        in_shape: (C, h, w) of the input features.
        out_size: side of the square output.

    Raises:
        ParamsError: a non-positive size or channel count.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_size: int = 224) -> None:
        super().__init__()
        channels, height, width = _check_shape(in_shape, out_size)
        self.out_size = out_size
        half = max(channels // 2, 1)
        self.attention = nn.Sequential(CBAM(channels), CBAM(channels))
        self.low_branch = _conv_bn_relu(channels, half)
        self.high_branch = _conv_bn_relu(channels, half)
        self.fusion = CBAM(2 * half)

        blocks: list[nn.Module] = []
        in_ch, steps = 2 * half, _doublings(height, out_size)
        for step in range(steps):
            out_ch = max(in_ch // 2, MIN_CHANNELS)
            if step == steps - 1:
                out_ch = FULL_RES_CHANNELS
            blocks.append(ResidualUpBlock(in_ch, out_ch))
            in_ch = out_ch
        self.upsample = nn.Sequential(*blocks)
        self.refine = MultiScaleRefinement(in_ch)
        self.to_rgb = nn.Conv2d(in_ch, 3, 3, padding=1)
        # Per-channel colour re-scaling of the RGB logits, identity at init.
        self.colour_scale = nn.Parameter(torch.ones(1, 3, 1, 1))
        self.colour_bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        x = self.attention(feats_nchw)
        size_hw = x.shape[-2:]
        pooled = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        low_pass = F.interpolate(pooled, size=size_hw, mode="bilinear", align_corners=False)
        # Low branch convolves at the pooled grid, then upsamples (see module docstring).
        low = F.interpolate(
            self.low_branch(pooled), size=size_hw, mode="bilinear", align_corners=False
        )
        high = self.high_branch(x - low_pass)
        x = self.upsample(self.fusion(torch.cat([low, high], dim=1)))
        if tuple(x.shape[-2:]) != (self.out_size, self.out_size):
            x = F.interpolate(
                x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False
            )
        logits = self.to_rgb(self.refine(x)) * self.colour_scale + self.colour_bias
        return (torch.tanh(logits) + 1.0) / 2.0


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _up2(feats_nchw: torch.Tensor) -> torch.Tensor:
    return F.interpolate(feats_nchw, scale_factor=2.0, mode="bilinear", align_corners=False)


def _doublings(height: int, out_size: int) -> int:
    """Number of ×2 steps that keep the map no larger than ``out_size``."""
    steps, size = 0, height
    while size * 2 <= out_size:
        size *= 2
        steps += 1
    return steps


def _check_shape(in_shape: tuple[int, int, int], out_size: int) -> tuple[int, int, int]:
    """Validate ``in_shape`` and ``out_size``; return (C, h, w) as ints."""
    channels, height, width = (int(v) for v in in_shape)
    if min(channels, height, width, int(out_size)) < 1:
        raise ParamsError(
            f"frequency_aware needs positive in_shape and out_size; "
            f"got in_shape {tuple(in_shape)}, out_size {out_size}"
        )
    return channels, height, width


@DECODERS.register("frequency_aware")
def _frequency_aware(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return FrequencyAwareDecoder(in_shape, out_size)
