"""Feature-matching refinement: optimise the image so the frozen encoder's features match.

Optimisation-based inversion after Mahendran & Vedaldi, "Understanding Deep
Image Representations by Inverting Them", CVPR 2015: starting from the
decoder's reconstruction, minimise ``MSE(encoder(x), target_features) +
tv·TV(x)`` over pixels ``x`` in [0, 1], the whole batch at once, and stop early
when the feature loss stops falling.  This is the one place the encoder runs
outside extraction.

Two choices matter on deep taps, where many images share the target's features:

* ``optimizer``: ``adam`` (per-pixel step sizes) or ``lbfgs`` (quasi-Newton with a
  strong-Wolfe line search).  Adam's per-coordinate scaling moves pixels in
  directions the features do not constrain; L-BFGS steps stay in the span of
  the feature gradients.
* ``smooth``: the correction to the decoder's output is optimised on a grid
  ``smooth`` times coarser and bilinearly upsampled, so refinement fixes the
  coarse structure the features pin down and keeps the decoder's finest detail.
  On random-init VGG-16 block3, matching features from a start of *true image +
  noise* left most of the noise in place (``benchmarks/refine_probe.py``):
  three max-pools deep, the finest octave is barely determined by the features.
* ``samples`` and ``noise``: average several refinements, each started from the
  decoder's output plus seeded Gaussian noise of std ``noise``.  Where the
  features leave detail undetermined, a single refinement fills it with
  texture of the right local energy but arbitrary phase, which costs PSNR; each
  sample gets a different phase, so the mean keeps what every sample agrees
  on (what the features pin down) and averages the rest away: an estimate of
  the posterior mean, which is what PSNR rewards.  Cost: ``samples`` refinements.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from featinv.config import REFINE_OPTIMIZERS, EvaluateConfig, check_refine_settings
from featinv.feature_store import FeatureStore
from featinv.taps import TapEncoder, build_encoder

__all__ = ["refine_images", "refine_reconstructions", "choose_refinement", "total_variation", "OPTIMIZERS"]

log = logging.getLogger(__name__)

PLATEAU_WINDOW = 10  # steps over which the feature loss must keep improving
PLATEAU_REL = 1e-3  # … by at least this relative amount, or refinement stops
OPTIMIZERS = REFINE_OPTIMIZERS
LBFGS_HISTORY = 20


def total_variation(pixels01_nchw: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    dh = (pixels01_nchw[..., 1:, :] - pixels01_nchw[..., :-1, :]).abs().mean()
    dw = (pixels01_nchw[..., :, 1:] - pixels01_nchw[..., :, :-1]).abs().mean()
    return dh + dw


def refine_images(
    init01: torch.Tensor,
    encoders: list[TapEncoder],
    targets: list[torch.Tensor],
    steps: int,
    lr: float = 0.01,
    tv: float = 0.0,
    early_stop: bool = True,
    optimizer: str = "adam",
    smooth: int = 1,
    samples: int = 1,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine a batch of images so each encoder's features match its target features.

    Args:
        init01: (N, 3, H, W) starting images in [0, 1].
        encoders: frozen tap encoders (several for an ensemble).
        targets: per encoder, the (N, C, h, w) features to match.
        steps: maximum optimiser steps (L-BFGS: iterations, each with its line search).
        lr: Adam learning rate on pixels (L-BFGS takes unit steps scaled by its line search).
        tv: weight of the total-variation prior.
        early_stop: stop when the feature loss plateaus.
        optimizer: ``adam`` or ``lbfgs``.
        smooth: optimise the correction on a grid this many times coarser (1 = every pixel).
        samples: refinements to average, each from ``init01`` plus fresh noise.
        noise: std of the Gaussian noise added to each sample's start (pixels in [0, 1]).
        seed: seeds the start noise, so a refinement is reproducible.

    Returns:
        The refined images (N, 3, H, W) in [0, 1] (the mean over samples) and a report
        (steps run per sample, seconds, feature loss before/after, the settings).

    Raises:
        ParamsError: unknown optimizer, ``smooth`` < 1, ``samples`` < 1, ``noise`` < 0,
            or several samples without noise (they would all be the same).
    """
    check_refine_settings(optimizer, smooth, samples, noise)
    start = time.perf_counter()
    scales = _target_scales(targets)
    base = init01.detach().clamp(0, 1).contiguous()
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(base)
    steps_run = []
    for _ in range(samples):
        start01 = base
        if noise > 0:  # drawn on the CPU so a seed gives the same starts on every device
            start01 = (base + noise * torch.randn(base.shape, generator=generator).to(base.device)).clamp(0, 1)
        refined, run = _refine_one(start01, encoders, targets, scales, steps, lr, tv, early_stop, optimizer, smooth)
        total += refined
        steps_run.append(run)
    mean = total / samples
    with torch.no_grad():
        initial = float(_feature_loss(base, encoders, targets, scales))
        final = float(_feature_loss(mean, encoders, targets, scales))
    report = {"steps": max(steps_run), "max_steps": steps, "optimizer": optimizer, "lr": lr, "tv": tv, "smooth": smooth,
              "samples": samples, "noise": noise, "seed": seed, "steps_per_sample": steps_run,
              "seconds": time.perf_counter() - start, "feature_loss_initial": initial, "feature_loss_final": final}
    return mean, report


def _target_scales(targets: list[torch.Tensor]) -> list[float]:
    # Each encoder's MSE is normalised by its target's energy so taps weigh equally.
    return [float(t.float().pow(2).mean().clamp_min(1e-12)) for t in targets]


def _feature_loss(img: torch.Tensor, encoders: list[TapEncoder], targets: list[torch.Tensor],
                  scales: list[float]) -> torch.Tensor:
    return sum(((enc(img) - tgt) ** 2).mean() / s for enc, tgt, s in zip(encoders, targets, scales))


def _refine_one(base: torch.Tensor, encoders: list[TapEncoder], targets: list[torch.Tensor], scales: list[float],
                steps: int, lr: float, tv: float, early_stop: bool, optimizer: str,
                smooth: int) -> tuple[torch.Tensor, int]:
    """One refinement from ``base``: the refined images and the steps it ran."""
    height, width = base.shape[-2:]
    grid_shape = (*base.shape[:2], -(-height // smooth), -(-width // smooth))  # ceil(H/smooth) × ceil(W/smooth)
    correction = base.new_zeros(grid_shape, requires_grad=True)

    def image() -> torch.Tensor:
        if smooth == 1:
            return base + correction
        up = F.interpolate(correction, size=(height, width), mode="bilinear", align_corners=False)
        return (base + up).clamp(0, 1)

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        img = image()
        loss = _feature_loss(img, encoders, targets, scales)
        return loss, (loss + tv * total_variation(img) if tv > 0 else loss)

    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([correction], lr=lr)
    else:
        opt = torch.optim.LBFGS([correction], lr=1.0, max_iter=1, history_size=LBFGS_HISTORY,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)
    history: list[float] = []
    run = 0
    for run in range(1, steps + 1):
        last: dict[str, float] = {}

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss, total = objective()
            total.backward()
            last["loss"] = float(loss.detach())
            return total

        opt.step(closure)
        if smooth == 1:
            with torch.no_grad():  # projected gradient: stay a valid image
                correction.copy_((base + correction).clamp_(0, 1) - base)
        history.append(last["loss"])
        if early_stop and len(history) > PLATEAU_WINDOW:
            old = history[-PLATEAU_WINDOW - 1]
            if old - history[-1] <= PLATEAU_REL * old:
                break
    with torch.no_grad():
        return image().clamp(0, 1).detach(), run


def refine_reconstructions(
    preds01: torch.Tensor,
    stores: list[FeatureStore],
    meta: dict,
    cfg: EvaluateConfig,
    device: torch.device,
    split: str = "test",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine a run's decoder outputs on ``split`` against the stores' cached features."""
    extract = meta["extract"]
    encoders, targets = [], []
    for store in stores:
        encoder = build_encoder(store.spec, extract["weights"], extract["weights_seed"], device)
        if encoder.weights != store.attrs["weights"]:
            from featinv.errors import StoreMismatchError

            raise StoreMismatchError(f"{store.path}: encoder weights {encoder.weights} differ from the store's")
        encoders.append(encoder)
        targets.append(torch.from_numpy(store.split(split)[:]).float().to(device))
    refined, report = refine_images(preds01.to(device), encoders, targets, cfg.refine, cfg.refine_lr, cfg.refine_tv,
                                    optimizer=cfg.refine_optimizer, smooth=cfg.refine_smooth,
                                    samples=cfg.refine_samples, noise=cfg.refine_noise, seed=cfg.refine_seed)
    log.info("refined %d images: %d steps in %.1fs, feature loss %.4g → %.4g", preds01.shape[0],
             report["steps"], report["seconds"], report["feature_loss_initial"], report["feature_loss_final"])
    return refined.cpu(), report


def choose_refinement(
    preds01: torch.Tensor,
    targets01: torch.Tensor,
    encoders: list[TapEncoder],
    feature_targets: list[torch.Tensor],
    candidates: list[dict[str, float]],
    steps: int,
) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """Pick refinement settings on a validation batch (never the test set).

    Args:
        preds01, targets01: decoder outputs and true pixels of the validation split.
        encoders, feature_targets: as for :func:`refine_images`.
        candidates: settings to try, each ``{"lr": ..., "tv": ...}`` and optionally
            ``"optimizer"``, ``"smooth"``, ``"samples"`` and ``"noise"`` (see :func:`refine_images`).
        steps: refinement steps per candidate.

    Returns:
        The best candidate by mean validation PSNR — or None when no candidate beats the
        decoder alone (refinement is then off for this tap) — and every candidate's score.
    """
    from featinv.metrics import image_metrics

    def mean_psnr(images: torch.Tensor) -> float:
        return float(sum(r["psnr"] for r in image_metrics(targets01, images.cpu())) / len(images))

    baseline = mean_psnr(preds01)
    scores = []
    for cand in candidates:
        settings = _settings(cand)
        refined, report = refine_images(preds01, encoders, feature_targets, steps, **settings)
        scores.append({**settings, "val_psnr": mean_psnr(refined), "val_psnr_decoder": baseline,
                       "steps": report["steps"], "seconds": report["seconds"]})
    best = max(scores, key=lambda s: s["val_psnr"], default=None)
    if best is None or best["val_psnr"] <= baseline:
        return None, scores
    return _settings(best), scores


def _settings(candidate: dict[str, Any]) -> dict[str, Any]:
    """A candidate's refinement settings, defaults filled in."""
    return {"lr": candidate["lr"], "tv": candidate.get("tv", 0.0), "optimizer": candidate.get("optimizer", "adam"),
            "smooth": candidate.get("smooth", 1), "samples": candidate.get("samples", 1),
            "noise": candidate.get("noise", 0.0)}
