"""featinv's own decoder: residual blocks at feature resolution + pixel-shuffle upsampling.

Data flow::

    feats (C, h, w) ─┬─ conv3×3 → 3·s² → PixelShuffle(s) ─────────── linear path ───────────┐
                     └─ conv3×3 → W ─┬─ [conv3×3 → ReLU → conv3×3 (+)] × K ─ conv3×3 ─(+)─┐   (+) → clamp[0,1]
                                     └──────────────── global skip ─────────────────────┘   │
          → [conv3×3 → PixelShuffle(2), channels halving] × log2(s) → conv3×3 → 3 (zero-init) ┘

Why this shape: most of the work happens at the feature resolution, where the
tap's information lives, as in EDSR (Lim et al., "Enhanced Deep Residual
Networks for Single Image Super-Resolution", CVPRW 2017: no BatchNorm, a global
residual) and ESPCN (Shi et al., CVPR 2016: sub-pixel convolution instead of
transposed convolutions, which avoids their checkerboard artefacts).  It is
fully convolutional with a small receptive field, so it can be trained on
random feature crops (``train.feature_crop``) — many more samples per CPU
second — and applied to whole images.

The "linear" path is a closed-form warm start (:meth:`warm_start`): each 3×3
window of standardised features, plus ``random_features`` fixed random ReLU
projections of it (random-feature regression, Rahimi & Recht, NeurIPS 2007), is
mapped to the s×s pixel block it covers by ridge regression, solved once from
the training features before any gradient step (about a minute of CPU on
VGG-16 block1 features of CBSD68); the residual network, whose last layer starts
at zero, then only learns the remainder.

The output is clamped to [0, 1] with a straight-through gradient: pixels that
overshoot still receive the loss's gradient, unlike with a saturating sigmoid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from featinv.decoders.closed_form import fit_standardisation, fit_window_ridge
from featinv.decoders.registry import DECODERS

__all__ = ["ResidualShuffleDecoder", "clamp01_ste"]

MIN_UP_CHANNELS = 32
RANDOM_FEATURE_SEED = 1234


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
    # After warm_start the linear path sits at its least-squares optimum; full-size Adam steps
    # (each weight moving ~lr per step) would shake it far more than the residual branch can fix.
    lr_multipliers = {"linear": 0.01, "rf_readout": 0.01}
    weight_decay_exempt = ("linear", "rf_readout")  # closed-form fits: decay would only bias them

    def __init__(self, in_shape: tuple[int, int, int], out_size: int = 224, width: int | None = None,
                 blocks: int = 6, random_features: int = 2048) -> None:
        super().__init__()
        channels, height, _ = in_shape
        # Per-channel standardisation, set from the training features by warm_start.
        self.register_buffer("feat_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, channels, 1, 1))
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
        nn.init.zeros_(self.tail.weight)  # the residual branch starts as "no correction"
        nn.init.zeros_(self.tail.bias)
        factor = 2**self.doublings
        # Fixed random ReLU features of each 3×3 window (never trained: a seeded projection).
        generator = torch.Generator().manual_seed(RANDOM_FEATURE_SEED)
        self.register_buffer("rf_weight", torch.randn(random_features, channels, 3, 3, generator=generator)
                             / math.sqrt(9 * channels))
        self.register_buffer("rf_bias", 0.5 * torch.randn(random_features, generator=generator))
        self.linear = nn.Sequential(nn.Conv2d(channels, 3 * factor * factor, 3, padding=1), nn.PixelShuffle(factor))
        self.rf_readout = nn.Conv2d(random_features, 3 * factor * factor, 1, bias=False)
        nn.init.zeros_(self.rf_readout.weight)
        nn.init.constant_(self.linear[0].bias, 0.5)  # around mid-grey until warm_start fits it
        self.scale = out_size / (height * factor)

    def _closed_form(self, z: torch.Tensor) -> torch.Tensor:
        """The ridge-fitted part: linear 3×3 map + read-out of the random ReLU features."""
        rf = F.relu(F.conv2d(z, self.rf_weight, self.rf_bias, padding=1))
        return self.linear(z) + self.linear[1](self.rf_readout(rf))

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        z = (feats_nchw - self.feat_mean) / self.feat_std
        x = self.head(z)
        x = x + self.body(x)
        x = self.tail(self.upsample(x)) + self._closed_form(z)
        if abs(self.scale - 1.0) > 1e-9:  # 224 / h not a power of two: finish with a resize
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return clamp01_ste(x)

    @property
    def ridge_shape(self) -> tuple[int, int]:
        """(columns, targets) of the warm start's regression: windows, random features, bias → a pixel block."""
        return self.linear[0].in_channels * 9 + self.rf_weight.shape[0] + 1, self.linear[0].out_channels

    @torch.no_grad()
    def warm_start(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], keep: float = 0.0625,
                   ridge: float = 1e-4, seed: int = 0) -> dict[str, float]:
        """Fit the linear path by ridge regression on (features, pixels01) training batches.

        Args:
            batches: a re-iterable of (feats (N, C, h, w), pixels01 (N, 3, H, W)) pairs at full
                resolution; it is read twice (standardisation statistics, then the normal equations).
            keep: fraction of feature positions sampled per batch (enough for the 9C+1 unknowns).
            ridge: Tikhonov weight, relative to the mean diagonal of XᵀX.
            seed: position sampling seed.

        Returns:
            ``{"positions": rows used, "seconds": time spent}``.
        """
        import time

        start = time.perf_counter()
        mean, std = fit_standardisation(f for f, _ in batches)  # pass 1 (batches is iterated twice)
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std)
        conv, factor = self.linear[0], self.linear[1].upscale_factor
        n_linear, n_random = conv.in_channels * 9, self.rf_weight.shape[0]
        rf_matrix = self.rf_weight.reshape(n_random, -1).T  # unfold order = (C, kh, kw), as the conv's
        solution, rows = fit_window_ridge(
            batches, lambda f: (f - self.feat_mean) / self.feat_std, kernel=3, factor=factor,
            extra=lambda x: F.relu(x @ rf_matrix + self.rf_bias), keep=keep, ridge=ridge, seed=seed)
        conv.weight.copy_(solution[:n_linear].T.reshape_as(conv.weight))
        self.rf_readout.weight.copy_(solution[n_linear:-1].T.reshape_as(self.rf_readout.weight))
        conv.bias.copy_(solution[-1])
        return {"positions": float(rows), "seconds": time.perf_counter() - start}


@DECODERS.register("residual_shuffle")
def _residual_shuffle(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return ResidualShuffleDecoder(in_shape, out_size)
