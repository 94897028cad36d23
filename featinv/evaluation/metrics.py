"""Image-quality metrics, computed as the published study did.

PSNR is scikit-image's ``peak_signal_noise_ratio`` formula (float64 MSE, data range 1),
written out here because importing it pulls in ``scipy.stats`` — 0.8 s of every study cell's
start-up (``python -m benchmarks.gpu --sections startup``); SSIM is scikit-image's
``structural_similarity`` (``data_range=1``, ``channel_axis=2``), both on float pixels in
[0, 1], HWC.  LPIPS(AlexNet) is reported when its pretrained weights
can be loaded and is ``None`` otherwise — never computed on random weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
# skimage.metrics loads its submodules lazily: this imports the SSIM module only (scipy.ndimage).
from skimage.metrics import structural_similarity

__all__ = ["psnr", "ssim", "image_metrics", "summarize", "LpipsMetric", "METRICS"]

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "lpips")
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON needs a number


def psnr(target01_hwc: np.ndarray, pred01_hwc: np.ndarray) -> float:
    """PSNR in dB for data range 1 (capped at 100 dB for identical images)."""
    mse = float(np.mean((target01_hwc.astype(np.float64) - pred01_hwc.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return float(min(10.0 * np.log10(1.0 / mse), PSNR_CAP_DB))


def ssim(target01_hwc: np.ndarray, pred01_hwc: np.ndarray) -> float:
    """Mean SSIM over RGB channels, data range 1 (skimage defaults: 7×7 uniform window)."""
    return float(
        structural_similarity(
            target01_hwc.astype(np.float64), pred01_hwc.astype(np.float64), data_range=1.0, channel_axis=2
        )
    )


def image_metrics(target01_nchw: torch.Tensor, pred01_nchw: torch.Tensor) -> list[dict[str, float]]:
    """PSNR and SSIM of every image of a batch."""
    targets = target01_nchw.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    preds = pred01_nchw.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [{"psnr": psnr(t, p), "ssim": ssim(t, p)} for t, p in zip(targets, preds)]


def summarize(values: Iterable[float | None]) -> dict[str, float] | None:
    """mean / std / min / max of the values, or None when any value is None (metric unavailable)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}


class LpipsMetric:
    """LPIPS(AlexNet) per image, or None everywhere (with one warning) when unavailable."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from featinv.errors import WeightsUnavailableError
        from featinv.training.losses import load_lpips

        self.note: str | None = None
        try:
            self.model = load_lpips().to(device)
        except WeightsUnavailableError as exc:
            self.model = None
            self.note = f"LPIPS not computed: {exc}"
            log.warning("%s", self.note)
        self.device = device

    def __call__(self, target01_nchw: torch.Tensor, pred01_nchw: torch.Tensor) -> Sequence[float | None]:
        if self.model is None:
            return [None] * target01_nchw.shape[0]
        with torch.no_grad():
            values = self.model(pred01_nchw.to(self.device) * 2 - 1, target01_nchw.to(self.device) * 2 - 1)
        return [float(v) for v in values.flatten()]
