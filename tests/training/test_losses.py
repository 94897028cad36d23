"""The reconstruction loss's pixel terms: what each one asks the decoder to prefer."""

import pytest
import torch

from featinv.config import LossConfig
from featinv.evaluation.metrics import psnr
from featinv.training.losses import ReconstructionLoss


def _with_mse(target: torch.Tensor, mses: list[float]) -> torch.Tensor:
    """target + a ±sqrt(mse) checkerboard per image: image i's MSE is exactly mses[i]."""
    sign = (torch.arange(target[0].numel()) % 2 * 2 - 1).float().view_as(target[0])
    return torch.stack([t + m ** 0.5 * sign for t, m in zip(target, mses)])


def _psnr_mean(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The figure evaluation reports: the mean of per-image PSNRs."""
    return sum(psnr(t.permute(1, 2, 0).numpy(), p.permute(1, 2, 0).numpy()) for t, p in zip(target, pred)) / len(pred)


def test_log_mse_prefers_what_mean_per_image_psnr_prefers_where_mse_does_not():
    """Evaluation reports the mean of per-image PSNRs. One image nearly perfect and one poor
    beats two mediocre ones on that mean; pooled MSE prefers the mediocre pair."""
    target = torch.full((2, 3, 8, 8), 0.5)
    uneven = _with_mse(target, [1e-6, 1e-2])  # 60 dB and 20 dB: mean 40
    even = _with_mse(target, [2e-3, 2e-3])  # 27 dB each
    assert _psnr_mean(uneven, target) > _psnr_mean(even, target)
    mse = ReconstructionLoss(LossConfig(mse=1.0))
    log_mse = ReconstructionLoss(LossConfig(mse=0.0, log_mse=1.0, log_mse_floor=1e-8))
    assert mse(uneven, target)[0] > mse(even, target)[0]
    assert log_mse(uneven, target)[0] < log_mse(even, target)[0]
    # far above the floor it is the mean of ln(MSE_i) less ln(floor): PSNR's own log
    expected = float(torch.log(torch.tensor([1e-6, 1e-2]) / 1e-8).mean())
    assert float(log_mse(uneven, target)[0]) == pytest.approx(expected, rel=1e-3)


def test_log_mse_is_mse_over_the_floor_for_samples_fitted_better_than_it():
    target = torch.full((4, 3, 2, 2), 0.25)
    pred = _with_mse(target, [1e-7, 2e-7, 4e-7, 8e-7])
    loss, parts = ReconstructionLoss(LossConfig(mse=0.0, log_mse=2.0, log_mse_floor=1e-4))(pred, target)
    assert parts["log_mse"] == pytest.approx(3.75e-7 / 1e-4, rel=1e-2)  # ln(1 + x) ≈ x for x ≪ 1
    assert float(loss) == pytest.approx(2 * parts["log_mse"], rel=1e-6)
    assert float(ReconstructionLoss(LossConfig(mse=0.0, log_mse=1.0))(target, target)[0]) == 0.0


def test_a_run_records_the_loss_terms_it_trains_on():
    assert LossConfig(mse=0.5, lpips=0.5).in_use() == {"mse": 0.5, "lpips": 0.5}
    assert LossConfig(mse=0.0, log_mse=1.0, log_mse_floor=1e-5).in_use() == {"log_mse": 1.0, "log_mse_floor": 1e-5}
