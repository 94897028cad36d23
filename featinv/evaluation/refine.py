"""Feature-matching refinement: optimise the image so the frozen encoder's features match.

Optimisation-based inversion after Mahendran & Vedaldi, "Understanding Deep
Image Representations by Inverting Them", CVPR 2015: starting from the
decoder's reconstruction, minimise ``MSE(encoder(x), target_features) +
tv·TV(x)`` over pixels ``x`` in [0, 1], the whole batch at once, and stop early
when the feature loss stops falling.  This is the one place the encoder runs
outside extraction.

Five settings matter on deep taps, where many images share the target's features (the
``deep_refine`` preset combines ``lbfgs``, ``smooth`` 2, one back-projection and ``tv`` 1; averaging
``samples`` won on random-weight features but lost on trained VGG-16 block3, where the preset was
re-chosen — BENCHMARKS.md, "Trained encoders").  On a shallow trained tap, per-pixel ``lbfgs``
(``shallow_refine``) beats Adam at 100 steps:

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
  the posterior mean, which is what PSNR rewards.  The starts come in
  antithetic pairs (noise, −noise): the noise a refinement leaves untouched
  cancels exactly within a pair instead of shrinking like 1/samples, so the mean
  needs fewer samples than independent starts would.  Cost: ``samples``
  refinements.
* ``tv``: a total-variation prior beside the (target-energy-normalised) feature loss.  Without
  it, L-BFGS on trained VGG-16 block3 peaked at ~100 steps and then fitted detail the features
  do not determine; with ``tv`` 1 it kept gaining to 200 steps (23.82 dB on 4 validation images,
  against 22.80 at 100 steps without it): piecewise-smooth is a better guess for that detail than
  whatever the feature gradients put there.
* ``backproject``: after matching, push the image along what the *decoder* reads
  as missing, ``x ← x + step·(D(f) − D(E(x)))`` — iterative back-projection
  (Irani & Peleg, 1991) with the trained decoder as the approximate inverse.
  Feature matching corrects what the encoder sees but accepts any image with
  the right features; the decoder was trained on natural photos, so its
  correction is the change a natural image would need.  Costs one encoder and
  one decoder pass per iteration.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from featinv.config import REFINE_OPTIMIZERS, EvaluateConfig, check_refine_settings
from featinv.errors import ParamsError
from featinv.store.feature_store import FeatureStore
from featinv.encoders.taps import TapEncoder

__all__ = ["refine_images", "refine_reconstructions", "choose_refinement", "total_variation", "OPTIMIZERS"]

log = logging.getLogger(__name__)

PLATEAU_WINDOW = 10  # steps over which the feature loss must keep improving
PLATEAU_REL = 1e-3  # … by at least this relative amount, or refinement stops
OPTIMIZERS = REFINE_OPTIMIZERS
# Curvature pairs L-BFGS keeps: enough to remember every step of a 100-step refinement. On
# trained vgg16/block1 (4 validation images, 100 steps) 100 pairs reached 47.21 dB, 50 pairs
# 47.15 and 20 pairs 46.65, at the same time per step; each pair costs two image-sized tensors.
LBFGS_HISTORY = 100
LBFGS_LINE_SEARCH_EVALS = 25  # objective evaluations one L-BFGS iteration's line search may spend


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
    decoder: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    backproject: int = 0,
    backproject_step: float = 1.0,
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
        noise: std of the Gaussian noise added to each sample's start (pixels in [0, 1]); samples
            come in antithetic pairs, the second starting from the first's noise negated.
        seed: seeds the start noise, so a refinement is reproducible.
        decoder: the run's model (features of every encoder → pixels in [0, 1]); needed for
            ``backproject``.
        backproject: decoder back-projection iterations after matching (0 = none).
        backproject_step: each back-projection iteration's step.

    Returns:
        The refined images (N, 3, H, W) in [0, 1] (the mean over samples) and a report
        (steps run per sample — with L-BFGS per sample and image —, seconds, feature loss before/after,
        the settings).

    Raises:
        ParamsError: unknown optimizer, ``smooth`` < 1, ``samples`` < 1, ``noise`` < 0,
            or several samples without noise (they would all be the same); a negative
            ``backproject``, a ``backproject_step`` ≤ 0, or ``backproject`` without a decoder.
    """
    check_refine_settings(optimizer, smooth, samples, noise, backproject, backproject_step)
    if backproject > 0 and decoder is None:
        raise ParamsError(f"refine_images: backproject={backproject} needs decoder= (the run's model)")
    start = time.perf_counter()
    scales = _target_scales(targets)
    base = init01.detach().clamp(0, 1).contiguous()
    # One noise stream per image, seeded by (seed, its index in the batch): one stream for the
    # batch would give an image other starts when the batch size changes.
    generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                  for i in range(len(base))]
    total = torch.zeros_like(base)
    steps_run = []
    # One L-BFGS problem per image: over a batch, its curvature estimate and line search would
    # couple the images, so an image's refinement would depend on which others share its batch
    # (on trained vgg16/block1, 19 images refined together stopped at 80 steps and 43.7 dB where
    # 4 reached 47.1). Adam's steps are per pixel already, so it takes the batch at once.
    slices = [slice(i, i + 1) for i in range(len(base))] if optimizer == "lbfgs" else [slice(None)]
    pieces = []  # (slice, its targets, their scales): the same for every sample
    for piece in slices:
        part = [t[piece] for t in targets]
        pieces.append((piece, part, _target_scales(part)))
    for index in range(samples):
        start01 = base
        if noise > 0:
            if index % 2 == 0:  # drawn on the CPU so a seed gives the same starts on every device
                draw = noise * torch.stack([torch.randn(base.shape[1:], generator=g)
                                            for g in generators]).to(base.device)
            # Antithetic pairs: the second sample of each pair starts from the opposite noise, so
            # whatever part of the noise refinement leaves in place cancels exactly in the mean.
            start01 = (base + (draw if index % 2 == 0 else -draw)).clamp(0, 1)
        for piece, part, part_scales in pieces:
            refined, run = _refine_one(start01[piece], encoders, part, part_scales, steps, lr, tv,
                                       early_stop, optimizer, smooth)
            total[piece] += refined
            steps_run.append(run)
    mean = total / samples
    if backproject > 0:
        mean = _backproject(mean, encoders, targets, decoder, backproject, backproject_step)
    with torch.no_grad():
        initial = float(_feature_loss(base, encoders, targets, scales))
        final = float(_feature_loss(mean, encoders, targets, scales))
    report = {"steps": max(steps_run), "max_steps": steps, "optimizer": optimizer, "lr": lr, "tv": tv, "smooth": smooth,
              "samples": samples, "noise": noise, "seed": seed, "backproject": backproject,
              "backproject_step": backproject_step, "steps_per_sample": steps_run,
              "seconds": time.perf_counter() - start, "feature_loss_initial": initial, "feature_loss_final": final}
    return mean, report


def _backproject(images: torch.Tensor, encoders: list[TapEncoder], targets: list[torch.Tensor],
                 decoder: Callable[[list[torch.Tensor]], torch.Tensor], iterations: int, step: float) -> torch.Tensor:
    """``iterations`` of x ← x + step·(D(f) − D(E(x))), kept in [0, 1]."""
    with torch.no_grad():
        wanted = decoder(targets)
        for _ in range(iterations):
            seen = decoder([encoder(images) for encoder in encoders])
            images = (images + step * (wanted - seen)).clamp(0, 1)
    return images


def _target_scales(targets: list[torch.Tensor]) -> list[float]:
    # Each encoder's MSE is normalised by its target's energy so taps weigh equally.
    return [float(t.float().pow(2).mean().clamp_min(1e-12)) for t in targets]


def _feature_loss(img: torch.Tensor, encoders: list[TapEncoder], targets: list[torch.Tensor],
                  scales: list[float]) -> torch.Tensor:
    return sum(((enc(img) - tgt) ** 2).mean() / s for enc, tgt, s in zip(encoders, targets, scales))


def _refine_one(base: torch.Tensor, encoders: list[TapEncoder], targets: list[torch.Tensor], scales: list[float],
                steps: int, lr: float, tv: float, early_stop: bool, optimizer: str,
                smooth: int) -> tuple[torch.Tensor, int]:
    """One refinement from ``base``: the refined images and the steps (optimiser iterations) it ran."""
    height, width = base.shape[-2:]
    grid_shape = (*base.shape[:2], -(-height // smooth), -(-width // smooth))  # ceil(H/smooth) × ceil(W/smooth)
    correction = base.new_zeros(grid_shape, requires_grad=True)

    def image() -> torch.Tensor:
        # A per-pixel correction is projected back into [0, 1] after each Adam step, and an
        # L-BFGS one only at the end (below); a coarse one cannot be, so its upsampled image is
        # clamped.  Clamping a per-pixel image here would freeze every pixel that overshoots the
        # range (zero gradient there).
        if smooth == 1:
            return base + correction
        return (base + F.interpolate(correction, size=(height, width), mode="bilinear", align_corners=False)).clamp(0, 1)

    losses: list[float] = []  # the feature loss of every evaluation

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        img = image()
        loss = _feature_loss(img, encoders, targets, scales)
        total = loss + tv * total_variation(img) if tv > 0 else loss
        total.backward()
        losses.append(float(loss.detach()))
        return total

    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([correction], lr=lr)
    else:
        # Several iterations per call: each call re-evaluates its starting point, which the previous
        # call's line search already did.  max_eval must be given: torch's default (max_iter · 5/4)
        # leaves a one-iteration call no line search at all, so a rejected unit step is never
        # shortened and refinement stalls at the start.
        per_call = PLATEAU_WINDOW
        opt = torch.optim.LBFGS([correction], lr=1.0, max_iter=per_call, max_eval=per_call * LBFGS_LINE_SEARCH_EVALS,
                                history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe",
                                tolerance_grad=0.0, tolerance_change=0.0)
    history: list[tuple[int, float]] = []  # (iterations run, feature loss there)
    run = 0
    while run < steps:
        if optimizer == "adam":
            opt.step(closure)
            run += 1
            current = losses[-1]
        else:
            opt.param_groups[0]["max_iter"] = min(per_call, steps - run)
            before = opt.state[correction].get("n_iter", 0)
            evaluated = len(losses)
            opt.step(closure)
            done = opt.state[correction]["n_iter"] - before
            if done == 0:  # no descent direction left: converged
                break
            run += done
            current = min(losses[evaluated:])  # the line search keeps its lowest point
        if smooth == 1 and optimizer == "adam":
            # Projected gradient: Adam's iterates stay a valid image. Not L-BFGS's: moving its
            # point between calls breaks the curvature pairs it has stored. On trained vgg16/block1
            # (4 validation images, 100 steps) projecting every 10 L-BFGS iterations reached
            # 46.94 dB, clamping only the result 47.62, in 35 s instead of 58; Adam gains from
            # the projection (43.15 vs 43.08 dB).
            with torch.no_grad():
                correction.copy_((base + correction).clamp_(0, 1) - base)
        history.append((run, current))
        if early_stop and _plateaued(history):
            break
    with torch.no_grad():
        return image().clamp(0, 1).detach(), run


def _plateaued(history: list[tuple[int, float]]) -> bool:
    """True when the feature loss fell by under PLATEAU_REL over the last PLATEAU_WINDOW steps."""
    run, current = history[-1]
    earlier = [loss for step, loss in history if step <= run - PLATEAU_WINDOW]
    if not earlier:
        return False
    old = earlier[-1]
    return old - current <= PLATEAU_REL * old


def refine_reconstructions(
    preds01: torch.Tensor,
    stores: list[FeatureStore],
    meta: dict,
    cfg: EvaluateConfig,
    device: torch.device,
    model: Callable[[list[torch.Tensor]], torch.Tensor],
    split: str = "test",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refine a run's decoder outputs on ``split`` against the stores' cached features.

    ``model`` is the run's reconstructor on ``device``, used by decoder back-projection.
    """
    encoders, targets = [], []
    for store in stores:
        encoder = store.build_encoder(device)
        if encoder.weights != store.attrs["weights"]:
            from featinv.errors import StoreMismatchError

            raise StoreMismatchError(f"{store.path}: encoder weights {encoder.weights} differ from the store's")
        encoders.append(encoder)
        targets.append(torch.from_numpy(store.split(split)[:]).float().to(device))
    refined, report = refine_images(preds01.to(device), encoders, targets, cfg.refine, cfg.refine_lr, cfg.refine_tv,
                                    optimizer=cfg.refine_optimizer, smooth=cfg.refine_smooth,
                                    samples=cfg.refine_samples, noise=cfg.refine_noise, seed=cfg.refine_seed,
                                    decoder=model, backproject=cfg.refine_backproject,
                                    backproject_step=cfg.refine_backproject_step)
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
    decoder: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """Pick refinement settings on a validation batch (never the test set).

    Args:
        preds01, targets01: decoder outputs and true pixels of the validation split.
        encoders, feature_targets: as for :func:`refine_images`.
        candidates: settings to try, each ``{"lr": ..., "tv": ...}`` and optionally
            ``"optimizer"``, ``"smooth"``, ``"samples"``, ``"noise"``, ``"backproject"`` and
            ``"backproject_step"`` (see :func:`refine_images`).
        steps: refinement steps per candidate.
        decoder: the run's model, for candidates that back-project.

    Returns:
        The best candidate by mean validation PSNR — or None when no candidate beats the
        decoder alone (refinement is then off for this tap) — and every candidate's score.
    """
    from featinv.evaluation.metrics import image_metrics

    def mean_psnr(images: torch.Tensor) -> float:
        return float(sum(r["psnr"] for r in image_metrics(targets01, images.cpu())) / len(images))

    baseline = mean_psnr(preds01)
    scores = []
    for cand in candidates:
        settings = _settings(cand)
        refined, report = refine_images(preds01, encoders, feature_targets, steps, decoder=decoder, **settings)
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
            "noise": candidate.get("noise", 0.0), "backproject": candidate.get("backproject", 0),
            "backproject_step": candidate.get("backproject_step", 1.0)}
