"""Score a trained run on a folder of images it never saw.

A decoder depends on its tap, the encoder weights, the input normalisation and the image
preprocessing — not on which images it was trained on.  So a run is tested on any folder by
preparing that folder as a test-only image store with the run's own preprocessing, extracting
the run's taps with the run's own encoder settings (cached, fingerprinted and reused like any
feature store), and evaluating as usual: same metrics schema, same baselines (the dataset mean
is the run's training split's, recorded in its checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from featinv.config import DataConfig, EvaluateConfig, ExtractConfig, from_mapping
from featinv.evaluation.evaluate import evaluate_run
from featinv.store.feature_store import extract_features, store_path
from featinv.data.image_store import prepare_images
from featinv.training.model import load_checkpoint
from featinv.data.sources import folder_pool

__all__ = ["evaluate_on_folder", "heldout_work_dir"]

log = logging.getLogger(__name__)


def heldout_work_dir(root: str | Path, folder: str | Path) -> Path:
    """``<root>/<folder name>-<8 hex of its absolute path>``: one cache per held-out folder."""
    folder = Path(folder)
    tag = hashlib.sha256(str(folder.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return Path(root) / f"{folder.name or 'images'}-{tag}"


def evaluate_on_folder(
    checkpoint: str | Path,
    folder: str | Path,
    work_dir: str | Path,
    cfg: EvaluateConfig,
    out_dir: str | Path,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on every image under ``folder``; write the reports into ``out_dir``.

    Args:
        checkpoint: a trained run's checkpoint.
        folder: the held-out images (any format featinv reads; subfolders included).
        work_dir: where the folder's image store and feature stores are cached.
        cfg: the ``evaluate`` params (refinement, device, grid).
        out_dir: receives ``eval.json``, ``eval_per_image.csv`` and ``reconstructions.png``.
        progress: called as ``progress(stage, done, total)``.

    Returns:
        The metrics dict (as :func:`featinv.evaluation.evaluate.evaluate_run`).

    Raises:
        CheckpointError / DataSourceError / BadImageError / WeightsUnavailableError / StorageError.
    """
    _, meta = load_checkpoint(checkpoint)
    trained = meta["config"]
    # The run's preprocessing; the images are the folder's (recorded as such in the image store).
    data = dataclasses.replace(from_mapping(DataConfig, trained["data"], "data"), source="folder", train_dir=None,
                               test_dir=str(folder), max_images=None)
    extract = from_mapping(ExtractConfig, {**trained["extract"], "device": cfg.device}, "extract")
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    images = work_dir / "images.zarr"
    prepare_images(data, trained["seed"], images, pools={"test": folder_pool(folder, "--on")},
                   progress=(lambda d, t: progress("prepare", d, t)) if progress else None)
    for spec in meta["taps"]:
        extract_features(images, spec["name"], store_path(work_dir / "features", spec["name"]), extract,
                         progress=(lambda d, t: progress(f"extract {spec['name']}", d, t)) if progress else None,
                         splits=("test",))
    metrics = evaluate_run(checkpoint, images, work_dir / "features", cfg, out_dir / "eval.json",
                           out_dir / "eval_per_image.csv", out_dir / "reconstructions.png", strict=False)
    log.info("evaluated %s on %d images of %s", checkpoint, metrics["n_images"], folder)
    return metrics
