"""Reconstruct any user image through a trained run: image → encoder tap → decoder (→ refinement).

Everything about the run — taps, weights, preprocessing — comes from the
checkpoint, so a user only names the run.  Features are rounded through
float16 exactly as the feature store holds them, so the decoder sees what it
was trained on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featinv.store.feature_store import encoder_normalisation
from featinv.data.images import preprocess_eval, read_rgb
from featinv.evaluation.metrics import image_metrics
from featinv.errors import CheckpointError
from featinv.training.model import check_checkpoint, load_checkpoint
from featinv.evaluation.refine import refine_images
from featinv.evaluation.render import comparison_rows, save_png, side_by_side
from featinv.encoders.taps import TapSpec, build_encoder

__all__ = ["Reconstruction", "reconstruct_images", "render_reconstructions"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Reconstruction:
    """One image's result: pixels in [0, 1] (H, W, 3) and its metrics."""

    path: Path
    original01: np.ndarray
    recon01: np.ndarray
    psnr: float
    ssim: float
    psnr_decoder: float | None = None  # before refinement, when refined


def reconstruct_images(
    paths: Sequence[str | Path], checkpoint: str | Path, refine: int = 0, device: str | torch.device = "cpu",
    strict: bool = True, **refine_settings: Any,
) -> list[Reconstruction]:
    """Run each image through the checkpoint's encoder(s) and decoder.

    ``refine`` > 0 then refines the reconstructions by feature matching; ``refine_settings``
    are :func:`featinv.evaluation.refine.refine_images`'s keywords (``lr``, ``tv``, ``optimizer``,
    ``smooth``, ``samples``, ``noise``, ``seed``, ``backproject``, ``backproject_step``).
    With ``strict``, a checkpoint of a training run that did not finish is refused; otherwise
    (a checkpoint the user named on purpose) it is used with a warning.

    Raises:
        BadImageError: an image cannot be read.
        CheckpointError: the checkpoint cannot be loaded, or (``strict``) its run did not finish.
        WeightsUnavailableError: the run's encoder weights cannot be loaded here.
    """
    model, meta = load_checkpoint(checkpoint, map_location=device)
    for problem in check_checkpoint(checkpoint, meta):
        if strict:
            raise CheckpointError(f"{problem}; re-run training, or name it with --run to use it anyway")
        log.warning("%s; using it anyway, as asked", problem)
    model.to(device)
    extract = meta["extract"]
    normalisations = meta.get("normalisation") or {}
    encoders = [build_encoder(TapSpec(**s), extract["weights"], extract["weights_seed"], device,
                              normalisation=encoder_normalisation(normalisations.get(s["name"])))
                for s in meta["taps"]]
    originals = []
    for path in paths:
        rgb = read_rgb(path)
        if min(rgb.shape[:2]) < meta["crop"]:
            log.warning("%s is smaller than the %d-pixel crop; it is upscaled", path, meta["crop"])
        originals.append(preprocess_eval(rgb, meta["resize"], meta["crop"]))
    pixels01 = torch.from_numpy(np.stack(originals)).permute(0, 3, 1, 2).float().div(255).to(device)
    with torch.no_grad():
        feats = [enc(pixels01).half().float() for enc in encoders]  # as cached: float16
        preds = model(feats).float().clamp(0, 1)
    decoder_rows = image_metrics(pixels01.cpu(), preds.cpu())
    final = preds
    if refine > 0:
        final, report = refine_images(preds, encoders, feats, refine, decoder=model, **refine_settings)
        log.info("refinement: %d steps in %.1fs", report["steps"], report["seconds"])
    rows = image_metrics(pixels01.cpu(), final.cpu())
    return [
        Reconstruction(Path(p), pixels01[i].permute(1, 2, 0).cpu().numpy(), final[i].permute(1, 2, 0).cpu().numpy(),
                       rows[i]["psnr"], rows[i]["ssim"], decoder_rows[i]["psnr"] if refine > 0 else None)
        for i, p in enumerate(paths)
    ]


def render_reconstructions(results: list[Reconstruction], out: str | Path, title: str = "") -> Path:
    """original | reconstruction | |difference| rows with PSNR/SSIM captions, saved as PNG."""
    rows = []
    for r in results:
        caption = f"{r.path.name}: PSNR {r.psnr:.2f} dB · SSIM {r.ssim:.3f}"
        if r.psnr_decoder is not None:
            caption += f" (decoder alone {r.psnr_decoder:.2f} dB)"
        rows.append(side_by_side(r.original01, r.recon01, caption))
    return save_png(comparison_rows(rows, title=title), out)
