"""Feature-matching refinement: optimise the image so the frozen encoder's features match.

Optimisation-based inversion after Mahendran & Vedaldi, "Understanding Deep
Image Representations by Inverting Them", CVPR 2015: starting from the
decoder's reconstruction, minimise ``MSE(encoder(x), target_features) +
tv·TV(x)`` over pixels ``x`` in [0, 1] with Adam, the whole batch at once, and
stop early when the feature loss stops falling.  This is the one place the
encoder runs outside extraction.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from featinv.config import EvaluateConfig
from featinv.feature_store import FeatureStore
from featinv.taps import TapEncoder, build_encoder

__all__ = ["refine_images", "refine_reconstructions", "total_variation"]

log = logging.getLogger(__name__)

PLATEAU_WINDOW = 10  # steps over which the feature loss must keep improving
PLATEAU_REL = 1e-3  # … by at least this relative amount, or refinement stops


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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine a batch of images so each encoder's features match its target features.

    Args:
        init01: (N, 3, H, W) starting images in [0, 1].
        encoders: frozen tap encoders (several for an ensemble).
        targets: per encoder, the (N, C, h, w) features to match.
        steps: maximum Adam steps.
        lr: Adam learning rate on pixels.
        tv: weight of the total-variation prior.
        early_stop: stop when the feature loss plateaus.

    Returns:
        The refined images (N, 3, H, W) in [0, 1] and a report (steps run, seconds,
        feature loss before/after).
    """
    start = time.perf_counter()
    # Each encoder's MSE is normalised by its target's energy so taps weigh equally.
    scales = [float(t.float().pow(2).mean().clamp_min(1e-12)) for t in targets]
    x = init01.detach().clone().clamp_(0, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    history: list[float] = []

    def feature_loss(img: torch.Tensor) -> torch.Tensor:
        return sum(((enc(img) - tgt) ** 2).mean() / s for enc, tgt, s in zip(encoders, targets, scales))

    with torch.no_grad():
        initial = float(feature_loss(x))
    run = 0
    for run in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = feature_loss(x)
        total = loss + tv * total_variation(x) if tv > 0 else loss
        total.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)  # projected gradient: stay a valid image
        history.append(float(loss.detach()))
        if early_stop and len(history) > PLATEAU_WINDOW:
            old = history[-PLATEAU_WINDOW - 1]
            if old - history[-1] <= PLATEAU_REL * old:
                break
    with torch.no_grad():
        final = float(feature_loss(x))
    report = {"steps": run, "max_steps": steps, "lr": lr, "tv": tv, "seconds": time.perf_counter() - start,
              "feature_loss_initial": initial, "feature_loss_final": final}
    return x.detach(), report


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
    refined, report = refine_images(preds01.to(device), encoders, targets, cfg.refine, cfg.refine_lr, cfg.refine_tv)
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
        candidates: settings to try, each ``{"lr": ..., "tv": ...}``.
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
        refined, report = refine_images(preds01, encoders, feature_targets, steps, cand["lr"], cand.get("tv", 0.0))
        scores.append({**cand, "val_psnr": mean_psnr(refined), "val_psnr_decoder": baseline,
                       "steps": report["steps"], "seconds": report["seconds"]})
    best = max(scores, key=lambda s: s["val_psnr"], default=None)
    if best is None or best["val_psnr"] <= baseline:
        return None, scores
    return {k: best[k] for k in ("lr", "tv")}, scores
