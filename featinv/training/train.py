"""Train a decoder (and, for ensembles, a fusion) from cached features.

The encoder is never built or run here: inputs are the tap's feature store(s),
targets the prepared pixels in [0, 1].  Adam; ReduceLROnPlateau (or cosine) on
the validation loss; early stopping; best/last checkpoints.  Progress is
reported through an :class:`EpochLogger` callback — the pipeline wires it to
dvclive, the library knows nothing about DVC.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Protocol

import torch

from featinv.data.image_store import dataset_mean_image
from featinv.config import Config, with_added_settings
from featinv.decoders import count_parameters
from featinv import precision
from featinv.device import resolve_device
from featinv.errors import StoreMismatchError
from featinv.mismatch import setting_differences
from featinv.store.feature_store import FeatureStore, expected_fingerprint, store_path
from featinv.data.image_store import ImageStore
from featinv.store.loader import FeatureBatches, FeatureCrop
from featinv.training.losses import ReconstructionLoss
from featinv.training.model import ENSEMBLE, Reconstructor, build_reconstructor, save_checkpoint, spec_dicts
from featinv.training.step import build_optimizer, training_step
from featinv.encoders.taps import resolve_tap
from featinv.zarr_utils import remove_tree

__all__ = ["EpochLogger", "TrainResult", "train_decoder", "run_taps", "open_feature_stores", "decoder_inputs",
           "check_image_store", "warm_start_keep"]

log = logging.getLogger(__name__)


class EpochLogger(Protocol):
    """Receives per-epoch metrics (``train/loss``, ``val/loss``, ``val/psnr``, ``lr``, ...)."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Summary of a training run (also stored in the checkpoints)."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped: str  # "epochs" | "early_stop" | "time_budget"
    train_seconds: float
    train_steps: int
    samples_seen: int  # training samples (feature windows, for window recipes) the decoder saw
    decoder_params: int
    device: str
    fallbacks: list[str]
    precision: str = "float32"  # what the decoder's steps computed in: float32 | bfloat16 (autocast)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["best_checkpoint"], d["last_checkpoint"] = str(self.best_checkpoint), str(self.last_checkpoint)
        return d


def run_taps(cfg: Config) -> list[str]:
    """The taps a run reads: ``encoder`` itself, or the ensemble's taps."""
    return list(cfg.study.ensemble_taps) if cfg.encoder == ENSEMBLE else [cfg.encoder]


def open_feature_stores(cfg: Config, images: ImageStore, features_dir: str | Path) -> list[FeatureStore]:
    """Open (and fingerprint-check) the feature stores of the run's taps.

    Raises:
        StoreIncompleteError / StoreMismatchError: a store is missing or was made differently.
    """
    stores = []
    for tap in run_taps(cfg):
        spec = resolve_tap(tap)
        expected = expected_fingerprint(spec, cfg.extract, images)
        store = FeatureStore(store_path(features_dir, tap), expected=expected)
        _check_storage_settings(store, cfg)
        stores.append(store)
    return stores


def _check_storage_settings(store: FeatureStore, cfg: Config) -> None:
    """The ``extract`` params outside the fingerprint (how values are stored) must agree too."""
    built = store.attrs.get("codec", {})
    differences = setting_differences(
        {"extract.codec": built.get("name"), "extract.clevel": built.get("clevel"),
         "extract.chunk_samples": built.get("chunk_samples")},
        {"extract.codec": cfg.extract.codec, "extract.clevel": cfg.extract.clevel,
         "extract.chunk_samples": cfg.extract.chunk_samples},
        has="store built with", wants="params say")
    if differences:
        raise StoreMismatchError(f"{store.path} was extracted with other settings: {'; '.join(differences)}. "
                                 "Re-extract it (`dvc repro extract@<tap>` or `featinv extract`), or restore the params")


def train_decoder(
    cfg: Config,
    images_path: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    logger: EpochLogger | None = None,
) -> TrainResult:
    """Train the configured decoder on the cached features; write ``best.pt`` and ``last.pt``.

    Args:
        cfg: the full run config (``encoder``, ``fusion``, ``decoder``, ``train``, ``extract``).
        images_path: the prepared image store (targets).
        features_dir: directory of feature stores (``<dir>/<tap>.zarr``).
        out_dir: where the checkpoints go.
        logger: per-epoch metrics sink.

    Raises:
        StoreMismatchError: a store's fingerprint does not match ``cfg``.
        WeightsUnavailableError: ``train.loss.lpips`` > 0 without LPIPS weights.
    """
    tc = cfg.train
    out_dir = Path(out_dir)
    images = ImageStore(images_path)
    check_image_store(cfg, images)
    stores = open_feature_stores(cfg, images, features_dir)
    device, fallbacks = resolve_device(tc.device, "train.device")
    precision.setup(device)
    amp_dtype, precision_fallbacks = precision.training_dtype(device, tc.precision)
    for note in precision_fallbacks:
        log.warning("%s", note)
    fallbacks = fallbacks + precision_fallbacks
    criterion = ReconstructionLoss(tc.loss).to(device)

    torch.manual_seed(tc.seed)
    specs = [s.spec for s in stores]
    model = build_reconstructor(specs, cfg.decoder, cfg.fusion if cfg.encoder == ENSEMBLE else None,
                                images.crop).to(device)
    n_params = count_parameters(model)
    crop = _feature_crop(tc.feature_crop, model, specs, images.crop)
    log.info("training %s on %s (%d parameters) on %s in %s", cfg.decoder, cfg.encoder, n_params, device,
             _dtype_name(amp_dtype))

    # On the CPU the RAM cache already is where the step runs; its host gathers stay as measured there.
    device_cache_gb = tc.device_cache_gb if device.type == "cuda" else 0.0
    train_batches = FeatureBatches([s.split("train") for s in stores], images.pixels("train"),
                                   tc.batch_size, shuffle=True, seed=tc.seed, ram_cache_gb=tc.ram_cache_gb,
                                   samples_per_epoch=tc.samples_per_epoch, drop_last=True, crop=crop, device=device,
                                   device_cache_gb=device_cache_gb)
    # Validation reads whole maps: a crop recipe's batch of thousands of windows is no guide.
    val_batch = min(max(tc.batch_size, 8), 16) if crop is not None else max(tc.batch_size, 8)
    val_batches = FeatureBatches([s.split("val") for s in stores], images.pixels("val"), val_batch,
                                 ram_cache_gb=tc.ram_cache_gb, device=device, device_cache_gb=device_cache_gb)
    optimizer = build_optimizer(model, tc.lr, device, tc.weight_decay)
    scheduler = _scheduler(optimizer, tc.scheduler, tc, steps=len(train_batches) * tc.epochs)

    meta = {
        "encoder": cfg.encoder,
        "fusion": cfg.fusion if cfg.encoder == ENSEMBLE else None,
        "decoder": cfg.decoder,
        "taps": spec_dicts(specs),
        "weights": stores[0].attrs["weights"],
        "store_fingerprints": {s.spec.name: s.attrs["fingerprint"] for s in stores},
        "store_fingerprint_parts": {s.spec.name: s.attrs["fingerprint_parts"] for s in stores},
        "normalisation": {s.spec.name: s.attrs["normalisation"] for s in stores},
        "images_fingerprint": images.fingerprint,
        "resize": int(images.attrs["preprocessing"]["resize"]),
        "crop": images.crop,
        "config": dataclasses.asdict(cfg),
        "extract": dataclasses.asdict(cfg.extract),
        "finished": False,  # set once the run ends normally; evaluation refuses an unfinished run
        # The training split's mean image: the "dataset mean" baseline of any later evaluation,
        # including one on held-out images that come without a training split.
        "train_mean01": dataset_mean_image(images.pixels("train")).half(),
    }
    # A previous run's checkpoints must not survive into this one: killed before its first
    # epoch, this run would otherwise leave them looking like its own result.
    for stale in ("best.pt", "last.pt"):
        remove_tree(out_dir / stale)
    best_loss, best_epoch, stale, steps, samples_seen = math.inf, 0, 0, 0, 0
    stopped = "epochs"
    start = time.perf_counter()

    def over_budget() -> bool:
        return tc.max_minutes is not None and time.perf_counter() - start >= tc.max_minutes * 60

    if hasattr(model.decoder, "warm_start") and len(specs) == 1:
        # Decoders with a closed-form part fit it first; the time counts towards the budget.
        whole = train_batches.whole_maps()
        positions = max(whole.n * specs[0].height * specs[0].width, 1)
        keep = warm_start_keep(positions, getattr(model.decoder, "ridge_shape", None))
        # The closed-form fit builds its systems on the CPU: fit there, then move back.
        report = model.cpu().decoder.warm_start(_FirstMap(whole), keep=keep, seed=tc.seed)
        model.to(device)
        log.info("warm start: linear path fitted on %d of %d positions in %.1fs", report["positions"], positions,
                 report["seconds"])
    epoch = 0
    for epoch in range(1, tc.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for feats, target in train_batches:
            feats, target = decoder_inputs(feats, device), target.to(device)
            # Windows with context: only the outputs whose window saw real context (decoders that
            # declare a context_margin provide forward_valid for that). bf16 on CUDA by default.
            loss = training_step(model, optimizer, criterion, feats, target, amp_dtype=amp_dtype,
                                 windows=crop is not None and bool(crop.margin))
            if tc.scheduler == "cosine":
                progress = steps / max(len(train_batches) * tc.epochs, 1)
                if tc.max_minutes:  # a wall-clock budget: anneal over the budget, not the epoch count
                    progress = max(progress, (time.perf_counter() - start) / (tc.max_minutes * 60))
                _set_lr(optimizer, tc.lr * _warmup_cosine(progress))
            total += float(loss) * target.shape[0]
            seen += target.shape[0]
            steps += 1
            if over_budget():  # mid-epoch: a long epoch (many views, a slow step) must not overrun it
                break
        samples_seen += seen
        val_loss, val_psnr = _validate(model, val_batches, criterion, device, amp_dtype)
        if tc.scheduler == "plateau":
            scheduler.step(val_loss)
        improved = val_loss < best_loss
        metrics = {"train/loss": total / max(seen, 1), "val/loss": val_loss, "val/psnr": val_psnr,
                   "lr": optimizer.param_groups[0]["lr"]}
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if logger is not None:
            logger.log_epoch(epoch, metrics)
        if improved:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            save_checkpoint(out_dir / "best.pt", model, meta, epoch=epoch, best_val_loss=val_loss)
        else:
            stale += 1
        save_checkpoint(out_dir / "last.pt", model, meta, epoch=epoch, best_val_loss=best_loss,
                        optimizer=optimizer.state_dict())
        if stale >= tc.early_stop_patience:
            stopped = "early_stop"
            break
        if over_budget():
            stopped = "time_budget"
            break
    seconds = time.perf_counter() - start
    result = TrainResult(out_dir / "best.pt", out_dir / "last.pt", best_epoch, best_loss, epoch, stopped,
                         seconds, steps, samples_seen, n_params, str(device), fallbacks, _dtype_name(amp_dtype))
    # Record the run summary in both checkpoints, and only now mark them finished.
    for path in (out_dir / "best.pt", out_dir / "last.pt"):
        _annotate(path, {"train_result": result.to_dict(), "finished": True})
    return result


def check_image_store(cfg: Config, images: ImageStore) -> None:
    """Refuse an image store built with other ``data`` params or seed than ``cfg``'s.

    Raises:
        StoreMismatchError: naming each differing setting (``data.resize: image store built with
            256, params say 288``) and the fix.
    """
    built = images.attrs.get("data")
    wanted = dataclasses.asdict(cfg.data)
    if built is None:  # a store from before the data params were recorded: compare what it kept
        built = {k: v for k, v in {"source": images.attrs.get("source"),
                                   **images.attrs.get("preprocessing", {})}.items() if k in wanted}
    else:
        built = with_added_settings("data", built)
    differences = setting_differences(
        {"data": {k: v for k, v in built.items() if k in wanted}, "seed": images.attrs.get("seed")},
        {"data": {k: wanted[k] for k in built if k in wanted}, "seed": cfg.seed},
        has="image store built with", wants="params say")
    if differences:
        raise StoreMismatchError(f"{images.path} was prepared with other settings: {'; '.join(differences)}. "
                                 "Re-run `dvc repro prepare` (or `featinv prepare`) and re-extract, or restore the params")


def _dtype_name(amp_dtype: torch.dtype | None) -> str:
    return "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


def decoder_inputs(feats: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Feature maps as the decoder's training step wants them: on ``device``, channels_last.

    channels_last because convolutions run faster on it: 1.18–1.47× per training step for five
    of the six decoders on the 2-core CPU, neutral for the sixth (``python -m
    benchmarks.memory_format``, BENCHMARKS.md).  It is also the format encoders hand out, so
    the cache-vs-encoder benchmark compares identical steps.
    """
    return [f.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last) if f.dim() == 4
            else f.to(device, non_blocking=True) for f in feats]


class _FirstMap:
    """Re-iterable view of a loader yielding (first feature map, pixels) pairs."""

    def __init__(self, batches: FeatureBatches) -> None:
        self.batches = batches

    def __iter__(self):
        return ((feats[0], target) for feats, target in self.batches)


def _feature_crop(size: int | None, model: Reconstructor, specs, crop_px: int) -> FeatureCrop | None:
    """The training windows for ``train.feature_crop``, with the decoder's context margin; validated."""
    if size is None:
        return None
    from featinv.errors import ParamsError

    if len(specs) != 1 or not getattr(model.decoder, "fully_convolutional", False):
        raise ParamsError(
            "`train.feature_crop` needs a single tap and a fully convolutional decoder "
            "(transposed_conv, residual_shuffle, local_mlp); set it to null"
        )
    height = specs[0].height
    if not 0 < size <= height or crop_px % height:
        raise ParamsError(f"`train.feature_crop` = {size} must be in 1..{height} for tap {specs[0].name}")
    return FeatureCrop(size, crop_px // height, int(getattr(model.decoder, "context_margin", 0)))


def _validate(model: Reconstructor, batches: FeatureBatches, criterion, device,
              amp_dtype: torch.dtype | None) -> tuple[float, float]:
    model.eval()
    total, psnr_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for feats, target in batches:
            feats, target = [f.to(device) for f in feats], target.to(device)
            with precision.autocast_to(device, amp_dtype):  # the model as it trains; metrics in float32
                pred = precision.float32(model(feats))
            loss, _ = criterion(pred, target)
            mse = ((pred - target) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            total += float(loss) * target.shape[0]
            psnr_sum += float((-10 * torch.log10(mse)).sum())
            n += target.shape[0]
    return total / max(n, 1), psnr_sum / max(n, 1)


def _scheduler(optimizer, kind: str, tc, steps: int):
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=tc.plateau_patience,
                                                          factor=tc.plateau_factor)
    if kind == "cosine":
        _set_lr(optimizer, tc.lr * _warmup_cosine(0.0))
    return None


WARM_START_ROWS = 400_000
# The fit's normal equations cost rows × columns × (columns + targets) multiply-adds; 4e12 is ~30 s
# on this 2-core CPU (130 GMAC/s in float32). It binds only on wide designs: vgg16/block4 (4,609
# columns → 768 targets) keeps 161 k rows, block5 (→ 3,072 targets) 113 k, ~25 per unknown.
WARM_START_MACS = 4e12


def warm_start_keep(positions: int, ridge_shape: tuple[int, int] | None) -> float:
    """Fraction of the training split's feature positions a closed-form warm start samples.

    ~WARM_START_ROWS positions (at least 2 %): enough equations for the unknowns on small grids
    (14×14 taps keep every position), affordable on large ones; fewer where the design —
    ``ridge_shape`` = (columns, targets), when the decoder declares it — is so wide that its
    normal equations alone would outgrow WARM_START_MACS and eat the training budget.
    """
    rows = max(WARM_START_ROWS, 0.02 * positions)
    if ridge_shape is not None:
        columns, targets = ridge_shape
        rows = min(rows, WARM_START_MACS / (columns * (columns + targets)))
    return min(1.0, rows / positions)


WARMUP = 0.03  # fraction of training spent warming the learning rate up
FINAL_LR_FRACTION = 0.01


def _warmup_cosine(progress: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 1 % at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < WARMUP:
        return max(progress / WARMUP, 0.01)
    t = (progress - WARMUP) / (1 - WARMUP)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t))


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _annotate(path: Path, extra: dict) -> None:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload.update(extra)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
