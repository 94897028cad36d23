"""Closed-form pieces shared by featinv's own decoders: feature standardisation and a
ridge fit of "k×k window of features → the s×s pixel block it covers".

Both run once on the training features before any gradient step (``warm_start``):
a least-squares solution is the best a linear read-out can do, so the network
that follows only has to learn the remainder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = ["CHUNK_ROWS", "fit_standardisation", "fit_window_ridge"]

CHUNK_ROWS = 8192  # sampled rows per float32 XᵀX product (at least; 8192 × 11,521 columns × 4 B = 377 MB)


@torch.no_grad()
def fit_standardisation(feats: Iterable[torch.Tensor], eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, h, w) feature batches, in one streaming pass.

    Returns:
        ``(mean, std)``, each (1, C, 1, 1) float32; ``std`` has ``eps`` added (dead channels).
    """
    total = total_sq = 0.0
    count = 0
    for f in feats:  # sums and sums of squares in float64
        f = f.double()
        total = total + f.sum((0, 2, 3))
        total_sq = total_sq + (f * f).sum((0, 2, 3))
        count += f.shape[0] * f.shape[2] * f.shape[3]
    if count == 0:
        raise ValueError("fit_standardisation: no feature batches")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float().view(1, -1, 1, 1), (std.float() + eps).view(1, -1, 1, 1)


def _windows(padded: torch.Tensor, rows: torch.Tensor, kernel: int, grid: torch.Size) -> torch.Tensor:
    """Rows ``rows`` of ``F.unfold(padded, kernel)`` laid out as (N·h·w, C·k²), gathered alone.

    The same values in the same order as unfolding every window and then picking, without
    building the windows that are not picked: with ``keep`` ≈ 0.1 the full unfold was a third of
    the warm start's time on trained vgg16/block3 (BENCHMARKS.md).
    """
    height, width = grid
    image, position = rows // (height * width), rows % (height * width)
    offsets = torch.arange(kernel)
    top = (position // width)[:, None, None] + offsets[None, :, None]  # (P, k, 1)
    left = (position % width)[:, None, None] + offsets[None, None, :]  # (P, 1, k)
    # Advanced indices around a slice put their (P, k, k) dimensions first: (P, k, k, C).
    return padded[image[:, None, None], :, top, left].permute(0, 3, 1, 2).reshape(len(rows), -1)


@torch.no_grad()
def fit_window_ridge(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    standardise: Callable[[torch.Tensor], torch.Tensor],
    kernel: int,
    factor: int,
    extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep: float = 0.0625,
    ridge: float = 1e-4,
    seed: int = 0,
    padding: str = "zeros",
) -> tuple[torch.Tensor, int]:
    """Ridge regression from each ``kernel``×``kernel`` feature window to its ``factor``² pixel block.

    Args:
        batches: (feats (N, C, h, w), pixels01 (N, 3, H, W)) pairs; pixels are resized to
            (h·factor, w·factor) when they differ (the decoder resizes its output at the end).
        standardise: maps raw features to the decoder's standardised input.
        kernel: odd window side.
        factor: pixel-shuffle factor: each position covers ``factor``² pixels.
        extra: optional map from the (rows, C·k²) window matrix to extra regressors
            (e.g. random ReLU features); they get their own rows in the solution.
        keep: fraction of positions sampled per batch.
        ridge: Tikhonov weight, relative to the mean diagonal of XᵀX.
        seed: position-sampling seed.
        padding: how windows at the border are filled, as the decoder pads: "zeros" (a
            ``padding=kernel//2`` conv) or "replicate".

    Returns:
        ``(solution, rows)``: solution is (C·k² [+ extra] + 1, 3·factor²) — window weights in
        ``F.unfold`` order (C, kh, kw), then the extra regressors, then the bias row.
    """
    generator = torch.Generator().manual_seed(seed)
    xtx = xty = None
    rows = 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # sampled (design, pixels) not yet in XᵀX

    def accumulate() -> None:
        # One float32 product per ≥ CHUNK_ROWS rows, added into float64 sums. Per batch, a wide
        # design (block4: 4,609 columns, ~500 rows a batch) spent more time converting and adding
        # the C²-sized product than computing it.
        nonlocal xtx, xty
        design, y = (torch.cat(part) for part in zip(*pending))
        pending.clear()
        if xtx is None:
            xtx = torch.zeros(design.shape[1], design.shape[1], dtype=torch.float64)
            xty = torch.zeros(design.shape[1], y.shape[1], dtype=torch.float64)
        xtx += (design.T @ design).double()
        xty += (design.T @ y).double()

    for feats, pixels01 in batches:
        size = (feats.shape[-2] * factor, feats.shape[-1] * factor)
        if pixels01.shape[-2:] != size:
            pixels01 = F.interpolate(pixels01, size=size, mode="bilinear", align_corners=False)
        z = F.pad(standardise(feats.float()), [kernel // 2] * 4, mode="constant" if padding == "zeros" else padding)
        y = F.pixel_unshuffle(pixels01.float(), factor).flatten(2).transpose(1, 2).flatten(0, 1)
        pick = torch.randperm(y.shape[0], generator=generator)[: max(1, int(y.shape[0] * keep))]
        x, y = _windows(z, pick, kernel, feats.shape[-2:]), y[pick]
        parts = [x] + ([extra(x)] if extra is not None else []) + [torch.ones(len(pick), 1)]
        pending.append((torch.cat(parts, dim=1), y))
        rows += len(pick)
        if sum(len(p) for p, _ in pending) >= CHUNK_ROWS:
            accumulate()
    if pending:
        accumulate()
    if xtx is None:
        raise ValueError("fit_window_ridge: no training batches")
    lam = ridge * xtx.diagonal().mean()
    eye = torch.eye(xtx.shape[0], dtype=torch.float64)
    return torch.linalg.solve(xtx + lam * eye, xty).float(), rows
