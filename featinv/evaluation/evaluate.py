"""Evaluate a trained run on the test split: metrics JSON, per-image CSV, reconstruction grid.

The decoder reads the same cached test features it was trained against (the
checkpoint records each store's fingerprint and evaluation refuses any other).
With ``refine > 0`` the decoder's output is then refined by feature matching
(:mod:`featinv.evaluation.refine`) — the one place the encoder runs outside extraction.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featinv.data.image_store import dataset_mean_image
from featinv.evaluation.baselines import baseline_metrics, thumbnail_name
from featinv.config import Config, EvaluateConfig
from featinv import precision
from featinv.device import resolve_device
from featinv.errors import CheckpointError, StorageError, StoreMismatchError
from featinv.store.feature_store import FeatureStore, decoder_input_differences, store_path
from featinv.data.image_store import ImageStore
from featinv.store.loader import FeatureBatches
from featinv.evaluation.metrics import LpipsMetric, image_metrics, summarize
from featinv.training.model import check_checkpoint, load_checkpoint
from featinv.evaluation.render import comparison_rows, save_png, side_by_side

__all__ = ["evaluate_run", "predict_split", "write_json"]

log = logging.getLogger(__name__)


def evaluate_run(
    checkpoint: str | Path,
    images_path: str | Path,
    features_dir: str | Path,
    cfg: EvaluateConfig,
    metrics_json: str | Path,
    per_image_csv: str | Path,
    grid_png: str | Path,
    run_config: Config | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the test split and write its three reports.

    Args:
        run_config: the params the run should have been trained with; a checkpoint trained with
            other ``encoder``/``decoder``/``train``/``extract``/``data`` settings is refused
            (None skips the comparison).
        strict: refuse a checkpoint whose run did not finish or whose params differ. False (a
            checkpoint the user named on purpose) evaluates it anyway, with a warning that is
            recorded in the metrics' ``notes``.

    Returns:
        The metrics dict written to ``metrics_json`` (``psnr``/``ssim``/``lpips`` each
        ``{mean, std, min, max}``, or ``lpips: null`` when LPIPS is unavailable).

    Raises:
        CheckpointError: unreadable checkpoint; with ``strict``, an unfinished run or other params.
        StoreMismatchError: the stores are not the ones the run was trained on.
    """
    device, fallbacks = resolve_device(cfg.device, "evaluate.device")
    model, meta = load_checkpoint(checkpoint)
    problems = check_checkpoint(checkpoint, meta, None if run_config is None else dataclasses.asdict(run_config))
    if problems and strict:
        raise CheckpointError(f"{'; '.join(problems)}. Re-run training (`dvc repro train`), or name the "
                              "checkpoint explicitly (`featinv evaluate --checkpoint PATH`) to evaluate it anyway")
    for problem in problems:
        log.warning("%s; evaluating it anyway, as asked", problem)
    model.to(device)
    images = ImageStore(images_path)
    stores = _stores_of(meta, features_dir)
    ids = images.ids("test")
    start = time.perf_counter()
    preds, targets = predict_split(model, stores, images, "test", device)
    decode_seconds = time.perf_counter() - start
    refine_info: dict[str, Any] = {"steps": 0}
    refined = None
    if cfg.refine > 0:
        from featinv.evaluation.refine import refine_reconstructions

        refined, refine_info = refine_reconstructions(preds, stores, meta, cfg, device, model)
    final = refined if refined is not None else preds

    rows = image_metrics(targets, final)
    lpips_metric = LpipsMetric(device)
    for row, value in zip(rows, lpips_metric(targets, final)):
        row["lpips"] = value
    if refined is not None:
        for row, base in zip(rows, image_metrics(targets, preds)):
            row["psnr_decoder"], row["ssim_decoder"] = base["psnr"], base["ssim"]

    metrics = {
        "psnr": summarize(r["psnr"] for r in rows),
        "ssim": summarize(r["ssim"] for r in rows),
        "lpips": summarize(r["lpips"] for r in rows),
        "n_images": len(rows),
        "test_set": {"images": str(images_path), "fingerprint": images.fingerprint},
        "encoder": meta["encoder"],
        "fusion": meta.get("fusion"),
        "decoder": meta["decoder"],
        "weights": meta["weights"],
        "decoder_params": meta["decoder_params"],
        "train": _train_summary(meta),
        "refine": refine_info,
        "decode_seconds": decode_seconds,
        "device": str(device),
        "notes": problems + fallbacks + ([lpips_metric.note] if lpips_metric.note else []) + _store_notes(stores),
    }
    if refined is not None:
        metrics["decoder_only"] = {"psnr": summarize(r["psnr_decoder"] for r in rows),
                                   "ssim": summarize(r["ssim_decoder"] for r in rows)}
    metrics.update(reference_scores(targets, images, meta, metrics))
    # The metrics JSON last: it is what marks an evaluation as done (DVC reads it).
    try:
        _write_csv(per_image_csv, ids, rows)
        _write_grid(grid_png, targets, final, rows, meta, limit=cfg.grid_images)
        write_json(metrics_json, metrics)
    except OSError as exc:
        raise StorageError(f"{exc.filename or metrics_json}: cannot write the evaluation's reports "
                           f"({exc.strerror or exc}); free space there or choose another output folder") from None
    log.info("test PSNR %.2f dB, SSIM %.3f over %d images", metrics["psnr"]["mean"], metrics["ssim"]["mean"], len(rows))
    return metrics


def tap_grid(meta: dict) -> tuple[int, int]:
    """The spatial grid a run's features have: its tap's h×w (an ensemble: its finest tap's)."""
    return max(((t["height"], t["width"]) for t in meta["taps"]), key=lambda hw: hw[0] * hw[1])


def reference_scores(targets01: torch.Tensor, images: ImageStore, meta: dict, metrics: dict) -> dict[str, Any]:
    """The non-learned baselines of the run's tap on the same test images, and the margin over the thumbnail.

    Returns:
        ``baselines`` (dataset mean image, per-image mean colour, thumbnail at the tap's grid; each
        ``{psnr, ssim, grid}``), ``psnr_over_thumbnail`` (the run's mean PSNR minus the thumbnail's:
        > 0 means the features give away more than an h×w colour thumbnail), and the same for the
        decoder alone when the run was refined.
    """
    grid = tap_grid(meta)
    train_mean01 = meta.get("train_mean01")  # the run's own training split (checkpoints since format 1.1)
    if train_mean01 is None and images.count("train"):
        train_mean01 = dataset_mean_image(images.pixels("train"))
    baselines = baseline_metrics(targets01, grid, None if train_mean01 is None else train_mean01.float())
    thumb = baselines[thumbnail_name(grid)]["psnr"]["mean"]
    out: dict[str, Any] = {"baselines": baselines, "psnr_over_thumbnail": metrics["psnr"]["mean"] - thumb}
    if "decoder_only" in metrics:
        out["decoder_only"] = {**metrics["decoder_only"],
                               "psnr_over_thumbnail": metrics["decoder_only"]["psnr"]["mean"] - thumb}
    return out


def predict_split(
    model: torch.nn.Module, stores: list[FeatureStore], images: ImageStore, split: str,
    device: torch.device, batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder reconstructions and targets, both (N, 3, H, W) float in [0, 1], on the CPU."""
    batches = FeatureBatches([s.split(split) for s in stores], images.pixels(split), batch_size)
    preds, targets = [], []
    model.eval()
    with torch.no_grad():
        for feats, target in batches:
            with precision.autocast(device):
                preds.append(model([f.to(device) for f in feats]).float().cpu())
            targets.append(target)
    return torch.cat(preds), torch.cat(targets)


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically (a reader never sees half a metrics file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stores_of(meta: dict, features_dir: str | Path) -> list[FeatureStore]:
    """The run's feature stores in ``features_dir``: any store whose features the decoder can read.

    A decoder depends on the tap, the encoder weights, the input normalisation and the image
    preprocessing — not on which images a store holds — so a run can be scored on a store of
    other (held-out) images extracted the same way.

    Raises:
        StoreMismatchError: a store's features were made differently, naming each differing field.
    """
    stores = []
    for spec in meta["taps"]:
        store = FeatureStore(store_path(features_dir, spec["name"]))
        trained = (meta.get("store_fingerprint_parts") or {}).get(spec["name"])
        if trained is None:  # a checkpoint from before the parts were recorded: only its exact store
            wanted = meta["store_fingerprints"][spec["name"]]
            differences = [] if store.attrs["fingerprint"] == wanted else [
                f"fingerprint {store.attrs['fingerprint'][:12]}…, the run was trained on {wanted[:12]}…"]
        else:
            differences = decoder_input_differences(store.attrs["fingerprint_parts"], trained)
        if differences:
            raise StoreMismatchError(f"{store.path} holds features the run was not trained on: "
                                     f"{'; '.join(differences)}; re-extract it with the run's settings, or re-train")
        if trained is not None and store.attrs["fingerprint_parts"]["images"] != trained["images"]:
            log.info("%s: evaluating on images other than the run's (same tap, weights and preprocessing)", store.path)
        stores.append(store)
    return stores


def _store_notes(stores: list[FeatureStore]) -> list[str]:
    notes = []
    for store in stores:
        notes += [f"extract {store.spec.name}: {note}" for note in store.attrs.get("fallbacks", [])]
        if store.attrs["weights"].startswith("random"):
            notes.append(f"{store.spec.name}: encoder weights are random ({store.attrs['weights']}), not pretrained")
    return notes


def _train_summary(meta: dict) -> dict:
    result = meta.get("train_result", {})
    keys = ("best_epoch", "epochs_run", "stopped", "train_seconds", "train_steps", "samples_seen", "best_val_loss")
    summary = {k: result.get(k) for k in keys}
    if "precision" in result:  # recorded by runs since train.precision existed (all float32 on a CPU before)
        summary["precision"] = result["precision"]
    return summary


def _write_csv(path: str | Path, ids: list[str], rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["image", *rows[0].keys()]
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for image_id, row in zip(ids, rows):
                writer.writerow({"image": image_id, **{k: ("" if v is None else v) for k, v in row.items()}})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_grid(path, targets, preds, rows, meta, limit: int) -> None:
    picks = np.linspace(0, len(rows) - 1, num=min(limit, len(rows))).round().astype(int)
    panels = []
    for i in dict.fromkeys(picks.tolist()):
        target = targets[i].permute(1, 2, 0).numpy()
        pred = preds[i].clamp(0, 1).permute(1, 2, 0).numpy()
        panels.append(side_by_side(target, pred, f"PSNR {rows[i]['psnr']:.2f} dB · SSIM {rows[i]['ssim']:.3f}"))
    run = meta["encoder"] if not meta.get("fusion") else f"ensemble/{meta['fusion']}"
    save_png(comparison_rows(panels, title=f"{run} + {meta['decoder']} ({meta['weights']})"), path)
