"""Non-learned reference reconstructions, to read every learned reconstruction against.

What a decoder recovers from a tap is only informative next to what needs no
features at all, or only as much as the tap's grid can carry:

* ``dataset_mean``: every test image replaced by the mean image of the training split
  (what a decoder that ignores its input converges to under an MSE loss);
* ``mean_colour``: each test image replaced by its own mean RGB (one number per channel);
* ``thumbnail_{h}x{w}``: the image area-downsampled to the tap's h×w grid and bicubic-upsampled
  back, i.e. an ideal h×w×3 colour summary at the tap's resolution. A decoder that does not beat
  it has learned no more than the tap's spatial layout gives away.

Scores use :func:`featinv.evaluation.metrics.image_metrics` and :func:`featinv.evaluation.metrics.summarize`, so they
share the run metrics' schema (mean/std/min/max per metric).  Pixels are floats in [0, 1], NCHW.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from featinv.data.image_store import dataset_mean_image
from featinv.errors import DataSourceError, ParamsError
from featinv.evaluation.metrics import image_metrics, summarize

__all__ = [
    "BASELINE_METRICS",
    "dataset_mean_image",
    "dataset_mean",
    "mean_colour",
    "thumbnail",
    "thumbnail_name",
    "baseline_reconstructions",
    "baseline_metrics",
]

BASELINE_METRICS = ("psnr", "ssim")  # LPIPS needs pretrained weights; these need nothing


def dataset_mean(targets01: torch.Tensor, train_mean01: torch.Tensor) -> torch.Tensor:
    """Every target replaced by the training split's mean image.

    Args:
        targets01: (N, 3, H, W) floats in [0, 1].
        train_mean01: (3, H, W) from :func:`dataset_mean_image`.

    Returns:
        (N, 3, H, W), a copy of ``train_mean01`` per target.

    Raises:
        ParamsError: bad shapes, or the mean image's size differs from the targets'.
    """
    _check_targets(targets01)
    if tuple(train_mean01.shape) != tuple(targets01.shape[1:]):
        raise ParamsError(
            f"train_mean has shape {tuple(train_mean01.shape)}, the targets {tuple(targets01.shape[1:])}; "
            "compute it from the training split at the same crop size"
        )
    return train_mean01.to(targets01).unsqueeze(0).expand_as(targets01).clone()


def mean_colour(targets01: torch.Tensor) -> torch.Tensor:
    """Each target replaced by its own mean RGB colour.

    Args:
        targets01: (N, 3, H, W) floats in [0, 1].

    Returns:
        (N, 3, H, W), constant per image and channel.

    Raises:
        ParamsError: ``targets01`` is not (N, 3, H, W).
    """
    _check_targets(targets01)
    return targets01.mean(dim=(2, 3), keepdim=True).expand_as(targets01).clone()


def thumbnail(targets01: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Each target area-downsampled to ``grid_hw`` and bicubic-upsampled back to its size.

    Args:
        targets01: (N, 3, H, W) floats in [0, 1].
        grid_hw: the tap's grid (h, w), 1 ≤ h ≤ H, 1 ≤ w ≤ W.

    Returns:
        (N, 3, H, W) clamped to [0, 1] (bicubic overshoots at edges).

    Raises:
        ParamsError: bad shapes or a grid outside the image.
    """
    _check_targets(targets01)
    h, w = _check_grid(grid_hw, targets01.shape[-2:])
    # Area interpolation is exact block averaging for integer factors and adaptive average pooling otherwise.
    small = F.interpolate(targets01, size=(h, w), mode="area")
    up = F.interpolate(small, size=tuple(targets01.shape[-2:]), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0)


def thumbnail_name(grid_hw: Sequence[int]) -> str:
    """``thumbnail_{h}x{w}``, the key of the thumbnail baseline at that grid."""
    h, w = grid_hw
    return f"thumbnail_{int(h)}x{int(w)}"


def baseline_reconstructions(
    targets01: torch.Tensor, grid_hw: Sequence[int], train_mean01: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The three baselines' reconstructions of ``targets01``.

    Args:
        targets01: (N, 3, H, W) floats in [0, 1].
        grid_hw: the tap's grid (h, w) for the thumbnail.
        train_mean01: (3, H, W) from :func:`dataset_mean_image`; None when no training split is at
            hand (then there is no ``dataset_mean`` baseline).

    Returns:
        ``{"dataset_mean": …, "mean_colour": …, "thumbnail_{h}x{w}": …}``, each (N, 3, H, W) in [0, 1].

    Raises:
        ParamsError: bad shapes or grid.
    """
    out = {} if train_mean01 is None else {"dataset_mean": dataset_mean(targets01, train_mean01)}
    return out | {
        "mean_colour": mean_colour(targets01),
        thumbnail_name(grid_hw): thumbnail(targets01, grid_hw),
    }


def baseline_metrics(
    targets01: torch.Tensor, grid_hw: Sequence[int], train_mean01: torch.Tensor | None
) -> dict[str, dict]:
    """PSNR and SSIM of each baseline, summarised like the run metrics.

    Args:
        targets01: (N, 3, H, W) floats in [0, 1] (the test images).
        grid_hw: the tap's grid (h, w).
        train_mean01: (3, H, W) from :func:`dataset_mean_image`.

    Returns:
        ``{name: {"psnr": {mean, std, min, max}, "ssim": {…}, "grid": [h, w]}}`` per baseline name of
        :func:`baseline_reconstructions`; ``grid`` is the tap grid the baselines were computed for.
        PSNR is capped at :data:`featinv.evaluation.metrics.PSNR_CAP_DB` for exact reconstructions.

    Raises:
        ParamsError: bad shapes or grid.
    """
    reconstructions = baseline_reconstructions(targets01, grid_hw, train_mean01)  # validates the inputs
    grid = [int(v) for v in grid_hw]
    out = {}
    for name, preds in reconstructions.items():
        rows = image_metrics(targets01, preds)
        out[name] = {m: summarize(r[m] for r in rows) for m in BASELINE_METRICS} | {"grid": grid}
    return out


# --------------------------------------------------------------------------- private helpers


def _check_targets(targets01: torch.Tensor) -> None:
    if not isinstance(targets01, torch.Tensor) or targets01.ndim != 4 or targets01.shape[1] != 3:
        shape = tuple(targets01.shape) if hasattr(targets01, "shape") else type(targets01).__name__
        raise ParamsError(f"targets01 has shape {shape}; expected (N, 3, H, W) floats in [0, 1]")
    if targets01.shape[0] == 0:
        raise ParamsError("targets01 holds no images; baselines need at least one test image")


def _check_grid(grid_hw: Sequence[int], image_hw: Sequence[int]) -> tuple[int, int]:
    H, W = int(image_hw[0]), int(image_hw[1])
    try:
        h, w = (int(v) for v in grid_hw)
        ok = 1 <= h <= H and 1 <= w <= W and tuple(grid_hw) == (h, w)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParamsError(f"grid_hw is {grid_hw!r}; expected two integers (h, w) with 1 ≤ h ≤ {H}, 1 ≤ w ≤ {W}")
    return h, w
