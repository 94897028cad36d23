"""Metrics as the published study computed them."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from featinv.evaluation.metrics import LpipsMetric, image_metrics, psnr, ssim, summarize


def test_psnr_ssim_are_skimage_with_unit_range():
    rng = np.random.default_rng(0)
    target = rng.random((32, 32, 3))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    assert psnr(target, pred) == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=1))
    assert ssim(target, pred) == pytest.approx(structural_similarity(target, pred, data_range=1, channel_axis=2))
    assert psnr(target, target) == 100.0


def test_known_psnr_value():
    target = np.zeros((8, 8, 3))
    assert psnr(target, target + 0.1) == pytest.approx(20.0)


def test_batch_metrics_and_summary():
    target = torch.rand(3, 3, 16, 16)
    rows = image_metrics(target, target.clamp(0, 0.9))
    assert len(rows) == 3 and all(r["ssim"] <= 1 for r in rows)
    summary = summarize([1.0, 2.0, 3.0])
    assert summary == {"mean": 2.0, "std": pytest.approx(0.8165, abs=1e-4), "min": 1.0, "max": 3.0}
    assert summarize([1.0, None]) is None


def test_lpips_metric_is_null_not_random_when_unavailable(monkeypatch):
    import featinv.training.losses
    from featinv.errors import WeightsUnavailableError

    def unavailable():  # as offline, whatever this machine's hub cache holds
        raise WeightsUnavailableError("pretrained AlexNet not found")

    monkeypatch.setattr(featinv.training.losses, "load_lpips", unavailable)
    metric = LpipsMetric()
    assert metric.model is None
    assert metric(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)) == [None, None]
    assert "LPIPS not computed" in metric.note


def test_metrics_do_not_import_scipy_stats():
    """Every study cell is a fresh process: importing the metrics must not pay for scipy.stats (0.8 s)."""
    import subprocess
    import sys

    code = "import sys, featinv.evaluation.metrics; print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
