"""The published study's transposed-convolution decoder.

Data flow: repeat [ConvTranspose2d(k4, s2, p1) → BatchNorm → ReLU], halving the
channels each time (never below 32), until the map reaches ``out_size``; then
Conv3×3 → 3 channels → Sigmoid.  Kept exactly as published so featinv can
reproduce the study; featinv's own decoders live beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from featinv.decoders.registry import DECODERS
from featinv.errors import ParamsError

__all__ = ["TransposedConvDecoder"]

MIN_CHANNELS = 32


class TransposedConvDecoder(nn.Module):
    """Stacked stride-2 transposed convolutions up to ``out_size``.

    Args:
        in_shape: (C, h, w) of the input features; ``out_size / h`` must be a power of two.
        out_size: side of the square output.
    """

    fully_convolutional = True

    def __init__(self, in_shape: tuple[int, int, int], out_size: int = 224) -> None:
        super().__init__()
        channels, height, _ = in_shape
        steps = _doublings(height, out_size)
        layers: list[nn.Module] = []
        for _ in range(steps):
            out_channels = max(channels // 2, MIN_CHANNELS)
            layers += [
                nn.ConvTranspose2d(channels, out_channels, kernel_size=4, stride=2, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        layers += [nn.Conv2d(channels, 3, kernel_size=3, padding=1), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        return self.layers(feats_nchw)


def _doublings(height: int, out_size: int) -> int:
    """How many ×2 upsamplings take ``height`` to ``out_size`` (must be exact)."""
    steps, size = 0, height
    while size < out_size:
        size *= 2
        steps += 1
    if size != out_size:
        raise ParamsError(
            f"transposed_conv needs out_size / feature height to be a power of two; "
            f"got feature height {height} for out_size {out_size}"
        )
    return steps


@DECODERS.register("transposed_conv")
def _transposed_conv(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return TransposedConvDecoder(in_shape, out_size)
