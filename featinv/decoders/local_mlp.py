"""featinv's local decoder: an MLP on each k×k window of features → the pixel block it covers.

Data flow::

    feats (C, h, w) → standardise ─┬─ conv k×k → 3·s² ───────────────────────────── linear path (ridge) ─┐
                                   └─ conv k×k → H → ReLU → conv1×1 → H → ReLU → conv1×1 → 3·s² (zero-init) ─(+)
        → PixelShuffle(s) → clamp[0,1]                                     s = out_size // h

Why this shape: an early tap is a *local* code — each feature position of VGG-16
block1 sees a 6×6 pixel patch — so inverting it is a per-position regression
from a small window of features to the s×s block of pixels under it.  A per-position
MLP is the right capacity for that and nothing else: no upsampling stack that
has to re-learn the pixel grid, no receptive field wider than the information.
It is fully convolutional with a tiny receptive field (``context_margin`` = k//2
feature positions), so training reads tiny random feature windows through
:meth:`forward_valid` — every step sees thousands of positions from thousands
of different places in the training set, which matters: in development runs,
independent positions learned clearly faster per step than a few 16×16 crops
(neighbouring positions are nearly the same example) — and the loss is taken
only where the window saw real context.

The linear path is fitted in closed form before training (ridge regression,
:mod:`featinv.decoders.closed_form`) and then moves at 1 % of the learning rate;
the MLP, whose last layer starts at zero, learns the non-linear remainder.
On CBSD68 → CSet14+5 with random VGG-16 block1 features it reaches 34.6 dB / SSIM
0.961 in 10 CPU-minutes (BENCHMARKS.md; the ridge path alone is ~30 dB).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from featinv.decoders.closed_form import fit_standardisation, fit_window_ridge
from featinv.decoders.registry import DECODERS
from featinv.decoders.residual_shuffle import clamp01_ste

__all__ = ["LocalMLPDecoder"]


class LocalMLPDecoder(nn.Module):
    """Per-position MLP from a ``kernel``×``kernel`` feature window to an s×s RGB block.

    Args:
        in_shape: (C, h, w) of the input features.
        out_size: side of the square output; s = out_size // h (the output is resized
            to ``out_size`` when h does not divide it).
        hidden: width of the two hidden layers.
        kernel: odd window side at the feature resolution.
    """

    fully_convolutional = True
    lr_multipliers = {"linear": 0.01}  # the ridge solution is already optimal for a linear map
    weight_decay_exempt = ("linear",)  # train.weight_decay regularises the MLP, not the ridge fit

    def __init__(self, in_shape: tuple[int, int, int], out_size: int = 224, hidden: int = 512,
                 kernel: int = 3) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"LocalMLPDecoder: kernel must be odd, got {kernel}")
        channels, height, _ = in_shape
        self.factor = max(1, out_size // height)
        self.scale = out_size / (height * self.factor)
        self.kernel = kernel
        self.context_margin = kernel // 2  # feature positions of context each output position needs
        block = 3 * self.factor**2
        self.register_buffer("feat_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, channels, 1, 1))
        # Unpadded convs: forward() pads the standardised map itself (edge-replicated, as the
        # training windows are at the map's border), forward_valid() does not pad at all.
        self.linear = nn.Conv2d(channels, block, kernel)
        nn.init.constant_(self.linear.bias, 0.5)  # mid-grey until warm_start fits it
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, block, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)  # starts as "no correction" to the linear path
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        z = F.pad((feats_nchw - self.feat_mean) / self.feat_std, [self.context_margin] * 4, mode="replicate")
        x = F.pixel_shuffle(self._linear_path(z) + self.mlp(z), self.factor)
        if abs(self.scale - 1.0) > 1e-9:  # out_size / h not an integer: finish with a resize
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return clamp01_ste(x)

    def forward_valid(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        """Pixels of the positions whose whole window lies inside the input (no padding).

        For training on feature windows that carry ``context_margin`` positions of context:
        an (N, C, 1 + 2m, 1 + 2m) window gives the s×s block of its centre, at the cost of
        one position — many thousand windows from different images fit in one step.
        """
        z = (feats_nchw - self.feat_mean) / self.feat_std
        if z.shape[-2:] != (self.kernel, self.kernel):
            return clamp01_ste(F.pixel_shuffle(self._linear_path(z) + self.mlp(z), self.factor))
        # One window per sample: the same layers as plain matrix products, ~3× faster on CPU
        # than convolutions over 3×3 inputs.
        x = z.flatten(1)
        hidden = x
        for layer in self.mlp:
            hidden = F.linear(hidden, layer.weight.flatten(1), layer.bias) if isinstance(layer, nn.Conv2d) \
                else layer(hidden)
        out = self._linear_path(x) + hidden.float()
        return clamp01_ste(F.pixel_shuffle(out[:, :, None, None], self.factor))

    def _linear_path(self, z: torch.Tensor) -> torch.Tensor:
        """The ridge path on standardised maps (N, C, h, w), or on flattened windows (N, C·k·k)."""
        # float32 even under bf16 autocast: this path carries the bulk of the image (the ridge
        # solution alone is ~30 dB on block1), where bf16's 8-bit mantissa would cost more than
        # the MLP's correction gains; it is 1/40 of the MLP's arithmetic.
        with torch.autocast(z.device.type, enabled=False):
            if z.dim() == 2:
                return F.linear(z.float(), self.linear.weight.flatten(1), self.linear.bias)
            return self.linear(z.float())

    @property
    def ridge_shape(self) -> tuple[int, int]:
        """(columns, targets) of the warm start's regression: window values + bias → an s×s RGB block."""
        return self.linear.in_channels * self.kernel**2 + 1, self.linear.out_channels

    @torch.no_grad()
    def warm_start(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], keep: float = 0.0625,
                   ridge: float = 1e-4, seed: int = 0) -> dict[str, float]:
        """Fit the standardisation and the linear path from (feats, pixels01) training batches.

        Args:
            batches: a re-iterable of full-map (feats (N, C, h, w), pixels01 (N, 3, H, W)) pairs;
                read twice (statistics, then the normal equations).
            keep: fraction of feature positions sampled per batch.
            ridge: Tikhonov weight, relative to the mean diagonal of XᵀX.
            seed: position-sampling seed.

        Returns:
            ``{"positions": rows used, "seconds": time spent}``.
        """
        start = time.perf_counter()
        mean, std = fit_standardisation(f for f, _ in batches)
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std)
        solution, rows = fit_window_ridge(batches, lambda f: (f - self.feat_mean) / self.feat_std,
                                          kernel=self.kernel, factor=self.factor, keep=keep, ridge=ridge, seed=seed,
                                          padding="replicate")
        self.linear.weight.copy_(solution[:-1].T.reshape_as(self.linear.weight))
        self.linear.bias.copy_(solution[-1])
        return {"positions": float(rows), "seconds": time.perf_counter() - start}


@DECODERS.register("local_mlp")
def _local_mlp(in_shape: tuple[int, int, int], out_size: int = 224) -> nn.Module:
    return LocalMLPDecoder(in_shape, out_size)
