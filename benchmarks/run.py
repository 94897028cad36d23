"""Performance suite: what the feature cache buys, as ratios measured within one run.

The machine is shared and noisy, so every figure is a RATIO of two quantities
measured back to back in the same run; absolute times are kept only as context.

1. ``cache_speedup``: training samples/s reading the cached store ÷ samples/s
   running the frozen encoder on the pixels every step (the published way).
   Both paths share one step function (transposed_conv, batch 4, MSE, Adam) and
   one loader; they differ only in where the features come from.
2. ``extraction_overhead``: ``extract_features`` wall time into a fresh store ÷
   pure encoder forward time over the same batches (inference mode, no I/O).
   Goal ≤ 1.15.
3. ``loader_headroom``: samples/s ``FeatureBatches`` delivers (streaming,
   ``ram_cache_gb=0``; ``loader_headroom_ram`` for the RAM cache) ÷ samples/s the
   training step consumes (from 1). Goal ≥ 3.
4. ``store_ratio``: bytes on disk per sample ÷ raw float16 bytes, per codec
   (test split only), with the extraction time of each codec.
5. ``study_speedup``: the 44-run study's wall time with the encoder in the loop
   ÷ through featinv (extract each tap once, then train from the cache) —
   extrapolated from measured rates to the study's budget; the JSON says from what.
6. ``memory``: peak RSS of ``train_decoder`` (a fresh process each, see
   ``benchmarks.peak_rss``) on N and 8N samples, streaming and RAM-cached.
7. ``scaling``: training samples/s vs batch size (vgg16/block1, from the
   cache) and extraction images/s vs batch size.

    python -m benchmarks.run --quick   # smoke run: 2 taps, tiny data, 3 steps (~1.5 min on 2 busy cores)
    python -m benchmarks.run --full    # all 8 taps, all study cells, the default sample data (48 images,
                                       # 4 views); expect most of an hour on a 2-core CPU

Encoder weights are random (seed 0); figures are on the CPU, plus the same
figures under ``gpu`` when CUDA is available. Prints a table per section and
writes benchmarks/results/perf.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import json
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from benchmarks.common import RESULTS, WORK, machine, table, write_json
from featinv.store import feature_store
from featinv.config import Config, DataConfig, ExtractConfig, LossConfig, TrainConfig, load_params, with_overrides
from featinv.presets import preset_overrides
from featinv.store.feature_store import FeatureStore, extract_features, store_path
from featinv.data.image_store import ImageStore, prepare_images
from featinv.store.loader import FeatureBatches
from featinv.training.losses import ReconstructionLoss
from featinv.training.model import ENSEMBLE, build_reconstructor
from featinv.data.sources import SPLITS, collect_images
from featinv.study.grid import plan_runs
from featinv.encoders.taps import TapEncoder, build_encoder, list_taps, resolve_tap
from featinv.training.step import build_optimizer, training_step
from featinv.training.train import decoder_inputs
from featinv.zarr_utils import digest, partial_path, remove_tree

__all__ = ["Plan", "QUICK", "FULL", "main"]

log = logging.getLogger("benchmarks.run")

REPO = Path(__file__).resolve().parents[1]
SEED = 42
WEIGHTS_SEED = 0
DECODER = "transposed_conv"  # the published decoder: figures 1, 3, 6, 7
BATCH = 4  # the published batch size
LR = 1e-3
MEMORY_TAP = "resnet34/layer1"  # the cheap tap
SCALING_TAP = "vgg16/block1"
CODECS = {"zstd-1": ("zstd", 1), "zstd-3": ("zstd", 3), "lz4-1": ("lz4", 1), "none": ("none", 0)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much one mode measures."""

    mode: str
    taps: tuple[str, ...]
    data: DataConfig  # the benchmark's images (prepared once per work dir, not timed)
    warmup: int  # untimed training steps before each timed rate
    steps: int  # timed training steps per rate (figures 1 and 7)
    study_steps: int  # timed steps for the study's other decoder/fusion cells
    study_decoders: tuple[str, ...] | None  # None: every decoder of params.yaml `study`
    study_ensembles: bool  # measure the fusion cells (needs the ensemble taps in `taps`)
    extract_batch: int
    loader_min_batches: int  # whole epochs are read until at least this many batches
    memory_views: tuple[int, int]  # train_views of the N and ~8N stores
    memory_samples_per_epoch: int  # training steps in each memory child (its peak is the point)
    train_batches: tuple[int, ...]
    extract_batches: tuple[int, ...]


# train_views=3 (18 train samples) rather than 1: batch 16 in figure 7 needs 16 samples.
QUICK = Plan("quick", ("vgg16/block1", "vit_small/block3"), DataConfig(source="sample", max_images=8, train_views=3),
             warmup=1, steps=3, study_steps=3, study_decoders=(DECODER,), study_ensembles=False, extract_batch=4,
             loader_min_batches=40, memory_views=(1, 8), memory_samples_per_epoch=4, train_batches=(4, 16),
             extract_batches=(1, 8))
FULL = Plan("full", tuple(s.name for s in list_taps()), DataConfig(source="sample"),
            warmup=2, steps=30, study_steps=5, study_decoders=None, study_ensembles=True, extract_batch=16,
            loader_min_batches=100, memory_views=(3, 24), memory_samples_per_epoch=32, train_batches=(4, 8, 16, 32, 64),
            extract_batches=(1, 4, 16, 32))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="smoke run: 2 taps, tiny data, 3 steps")
    mode.add_argument("--full", action="store_true", help="all taps, the default sample data")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="auto: the CPU, plus CUDA when available (reported under `gpu`)")
    p.add_argument("--work", type=Path, default=WORK / "perf", help="scratch dir for stores")
    p.add_argument("--out", type=Path, default=RESULTS / "perf.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("featinv").setLevel(logging.WARNING)
    plan = FULL if args.full else QUICK
    # The published 44-run grid, whatever the default study is.
    params = with_overrides(load_params(REPO / "params.yaml"), preset_overrides("published_study"))
    images = _prepared(plan.data, args.work)

    result = {
        "machine": machine(),
        "mode": plan.mode,
        "command": " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {**dataclasses.asdict(plan), "weights": f"random (seed {WEIGHTS_SEED})", "decoder": DECODER,
                     "batch_size": BATCH, "lr": LR, "loss": "mse", "counts": _counts(images)},
    }
    devices = [torch.device("cpu")]
    if args.device == "auto" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        section = measure_device(plan, params, images, args.work / device.type, device)
        if device.type == "cpu":
            result.update(section)
        else:
            result["gpu"] = {"device": torch.cuda.get_device_name(device), **section}
    result["memory"] = memory_figure(plan, args.work / "memory")
    _print_memory(result["memory"])
    write_json(args.out, _rounded(result))
    log.info("wrote %s", args.out)
    return result


def measure_device(plan: Plan, params: Config, images: Path, work: Path, device: torch.device) -> dict:
    """Figures 1–5 for every tap of ``plan``, and figure 7, on ``device``."""
    features = work / "features"
    extract = dataclasses.replace(params.extract, weights="random", weights_seed=WEIGHTS_SEED, device=str(device),
                                  batch_size=plan.extract_batch)
    encoders: dict[str, TapEncoder] = {}
    taps: dict[str, dict] = {}
    for tap in plan.taps:
        log.info("%s on %s", tap, device)
        row, encoders[tap] = extraction_overhead(images, tap, store_path(features, tap), extract, device)
        store = FeatureStore(store_path(features, tap))
        row |= cache_speedup([store], images, [encoders[tap]], DECODER, None, plan.warmup, plan.steps, device,
                             params.train.ram_cache_gb)
        row |= loader_headroom(store, images, row["train_samples_per_s_cache"], plan.loader_min_batches,
                               params.train.ram_cache_gb)
        row |= store_ratio(images, tap, encoders[tap], work / "codecs", extract)
        taps[tap] = row
    _print_taps(taps, device)
    study = study_speedup(plan, params, images, features, encoders, taps, device)
    _print_study(study, device)
    scaling = scaling_figure(plan, images, features, encoders[SCALING_TAP], work / "scaling", extract, device,
                             params.train.ram_cache_gb)
    _print_scaling(scaling, device)
    return {"taps": taps, "study_speedup": study["study_speedup"], "study": study, "scaling": scaling}


# ------------------------------------------------------------------------------------ figures


def cache_speedup(stores: list[FeatureStore], images: Path, encoders: list[TapEncoder], decoder: str,
                  fusion: str | None, warmup: int, steps: int, device: torch.device, ram_cache_gb: float) -> dict:
    """Figure 1 (and one cell of figure 5): training samples/s from the cache ÷ with the encoder in the loop.

    Both paths use the same seeded loader order over the training pixels, the
    same decoder initialisation and the same step; the cached path gets the
    features from the store, the naive one runs the frozen encoder(s) on the
    pixels under ``no_grad``.  The two step in turn (see :func:`_train_rates`).
    Also measures decoder inference samples/s from the cache (evaluation, for
    figure 5).
    """
    log.info("  cache vs encoder in the loop: %s", decoder if fusion is None else f"{fusion} + {decoder}")
    pixels = ImageStore(images).pixels("train")
    specs = [s.spec for s in stores]
    cached = FeatureBatches([s.split("train") for s in stores], pixels, BATCH, shuffle=True, seed=SEED,
                            ram_cache_gb=ram_cache_gb, drop_last=True)
    naive = FeatureBatches([], pixels, BATCH, shuffle=True, seed=SEED, drop_last=True)  # pixels only

    # Both paths hand the decoder the same memory format (featinv's training step's, see
    # decoder_inputs), so the steps are identical and only the features' origin differs.
    def from_cache(feats, pixels01):
        return decoder_inputs(feats, device)

    def from_encoders(feats, pixels01):
        with torch.no_grad():
            return decoder_inputs([encoder(pixels01) for encoder in encoders], device)

    model = _fresh_model(specs, decoder, fusion, device)
    cache_rate, naive_rate = _train_rates([(model, cached, from_cache),
                                           (_fresh_model(specs, decoder, fusion, device), naive, from_encoders)],
                                          warmup, steps, device)
    eval_batches = FeatureBatches([s.split("train") for s in stores], pixels, max(BATCH, 8),
                                  ram_cache_gb=ram_cache_gb)
    eval_rate = _eval_rate(model, eval_batches, max(1, steps // 3), device)
    return {"cache_speedup": cache_rate / naive_rate, "train_samples_per_s_cache": cache_rate,
            "train_samples_per_s_naive": naive_rate, "eval_samples_per_s_cache": eval_rate}


def extraction_overhead(images: Path, tap: str, out: Path, cfg: ExtractConfig,
                        device: torch.device) -> tuple[dict, TapEncoder]:
    """Figure 2: ``extract_features`` into a fresh store ÷ the encoder's forward alone on the same batches.

    Returns the figures and the encoder extraction built (kept for the other figures).
    """
    log.info("  extraction overhead")
    remove_tree(out)
    remove_tree(partial_path(out))
    with _keeping_encoder() as kept:
        report = extract_features(images, tap, out, cfg)
    encoder, build = kept["encoder"], kept["build_seconds"]
    forward = _pure_forward_seconds(encoder, images, cfg.batch_size, device)
    computed = report.computed
    return {
        "extraction_overhead": report.seconds / forward,
        # extract_features builds its encoder (a whole random network); on small data that dominates.
        "extraction_overhead_without_build": (report.seconds - build) / forward,
        "extract_seconds": report.seconds,
        "encoder_build_seconds": build,
        "forward_seconds": forward,
        "library_forward_seconds": report.forward_seconds,
        "extract_samples": computed,
        "extract_images_per_s": computed / report.seconds,
    }, encoder


def loader_headroom(store: FeatureStore, images: Path, train_rate: float, min_batches: int,
                    ram_cache_gb: float) -> dict:
    """Figure 3: samples/s ``FeatureBatches`` delivers (no training) ÷ samples/s training consumes."""
    log.info("  loader headroom")
    pixels = ImageStore(images).pixels("train")
    t0 = time.perf_counter()
    in_ram = FeatureBatches([store.split("train")], pixels, BATCH, shuffle=True, seed=SEED, ram_cache_gb=ram_cache_gb)
    ram_load = time.perf_counter() - t0
    streaming = FeatureBatches([store.split("train")], pixels, BATCH, shuffle=True, seed=SEED, ram_cache_gb=0.0)
    assert in_ram.in_ram and not streaming.in_ram  # the figure compares exactly these two modes
    ram_rate = _delivery_rate(in_ram, min_batches)
    stream_rate = _delivery_rate(streaming, min_batches)
    return {"loader_headroom": stream_rate / train_rate, "loader_headroom_ram": ram_rate / train_rate,
            "loader_samples_per_s_stream": stream_rate, "loader_samples_per_s_ram": ram_rate,
            "ram_load_seconds": ram_load, "ram_load_samples": in_ram.n}


def store_ratio(images: Path, tap: str, encoder: TapEncoder, work: Path, cfg: ExtractConfig) -> dict:
    """Figure 4: bytes on disk per sample ÷ raw float16 bytes, and extraction seconds, per codec (test split).

    The encoder is built once and reused for every codec: its build time is the
    same for all of them and would only blur the comparison.
    """
    log.info("  store size per codec")
    spec = resolve_tap(tap)
    raw = int(np.prod(spec.shape)) * 2
    ratios, seconds, per_sample = {}, {}, {}
    for label, (codec, clevel) in CODECS.items():
        out = store_path(work / label, tap)
        remove_tree(out)
        remove_tree(partial_path(out))
        with _reusing(encoder):
            report = extract_features(images, tap, out, dataclasses.replace(cfg, codec=codec, clevel=clevel),
                                      splits=("test",))
        n = report.counts["test"]
        per_sample[label] = _dir_bytes(out / "test") / n
        ratios[label] = per_sample[label] / raw
        seconds[label] = report.seconds
    return {"store_ratio": ratios, "store_extract_seconds": seconds, "store_bytes_per_sample": per_sample,
            "raw_bytes_per_sample": raw}


def study_speedup(plan: Plan, params: Config, images: Path, features: Path, encoders: dict[str, TapEncoder],
                  taps: dict[str, dict], device: torch.device) -> dict:
    """Figure 5: the study's estimated wall time with the encoder in the loop ÷ through featinv.

    Per run, featinv pays: loading the run's stores into RAM + training steps
    from the cache + evaluation (val every epoch, then test) from the cache; plus
    each tap's extraction once.  The naive path pays per run: building the
    encoder(s) + training steps with the encoder forward + evaluation with the
    encoder forward.  Rates come from the cells measured here, extrapolated to
    the study's data and budget; unmeasured cells take the mean per-sample time
    of the measured ones on the same path.
    """
    study = params.study
    counts = _study_counts(params)
    n_all = sum(counts.values())
    train_per_run = study.epochs * min(study.samples_per_epoch or counts["train"], counts["train"])
    eval_per_run = study.epochs * counts["val"] + counts["test"]
    decoders = plan.study_decoders or study.decoders
    bench_train = ImageStore(images).count("train")

    cells: dict[tuple, dict] = {}
    for tap in plan.taps:
        if tap not in study.taps:
            continue
        for decoder in decoders:
            if decoder == DECODER:
                rates = taps[tap]  # figure 1 measured this cell
            else:
                log.info("study cell %s + %s", tap, decoder)
                rates = cache_speedup([FeatureStore(store_path(features, tap))], images, [encoders[tap]], decoder,
                                      None, plan.warmup, plan.study_steps, device, params.train.ram_cache_gb)
            cells[(tap, None, decoder)] = rates
    if plan.study_ensembles and all(t in encoders for t in study.ensemble_taps):
        stores = [FeatureStore(store_path(features, t)) for t in study.ensemble_taps]
        for fusion in study.fusions:
            for decoder in decoders:
                log.info("study cell %s-%s + %s", ENSEMBLE, fusion, decoder)
                cells[(ENSEMBLE, fusion, decoder)] = cache_speedup(
                    stores, images, [encoders[t] for t in study.ensemble_taps], decoder, fusion, plan.warmup,
                    plan.study_steps, device, params.train.ram_cache_gb)

    def per_tap(fn: Callable[[dict], float]) -> dict[str, float]:
        measured = {t: fn(taps[t]) for t in taps}
        mean = float(np.mean(list(measured.values())))
        return {t: measured.get(t, mean) for t in dict.fromkeys(study.taps + study.ensemble_taps)}

    build = per_tap(lambda r: r["encoder_build_seconds"])
    # Extraction = one encoder build + a per-sample cost, so a tiny benchmark set does not inflate it.
    extract_per_sample = per_tap(lambda r: (r["extract_seconds"] - r["encoder_build_seconds"])
                                 / r["extract_samples"])
    forward_per_sample = per_tap(lambda r: r["forward_seconds"] / r["extract_samples"])
    ram_load_per_sample = per_tap(lambda r: r["ram_load_seconds"] / bench_train)
    extract_seconds = {t: build[t] + extract_per_sample[t] * n_all for t in study.taps}

    mean_rate = {k: 1 / float(np.mean([1 / c[k] for c in cells.values()]))
                 for k in ("train_samples_per_s_cache", "train_samples_per_s_naive", "eval_samples_per_s_cache")}
    featinv_runs = naive_runs = 0.0
    rows = []
    for run in plan_runs(params):
        run_taps = list(study.ensemble_taps) if run.encoder == ENSEMBLE else [run.encoder]
        cell = cells.get((run.encoder, run.fusion, run.decoder))
        rates = cell or mean_rate
        eval_cache = eval_per_run / rates["eval_samples_per_s_cache"]
        featinv = (sum(ram_load_per_sample[t] for t in run_taps) * (counts["train"] + counts["val"])
                   + train_per_run / rates["train_samples_per_s_cache"] + eval_cache)
        naive = (sum(build[t] for t in run_taps) + train_per_run / rates["train_samples_per_s_naive"]
                 + eval_cache + eval_per_run * sum(forward_per_sample[t] for t in run_taps))
        featinv_runs += featinv
        naive_runs += naive
        rows.append({"run": f"{run.label} + {run.decoder}", "measured": cell is not None,
                     "featinv_seconds": featinv, "naive_seconds": naive,
                     "cache_speedup": rates["train_samples_per_s_cache"] / rates["train_samples_per_s_naive"]})
    featinv_total = featinv_runs + sum(extract_seconds.values())
    return {
        "study_speedup": naive_runs / featinv_total,
        "definition": "naive_seconds / featinv_seconds (> 1: featinv is faster)",
        "extrapolated": True,
        "from": (f"{sum(r['measured'] for r in rows)} of {len(rows)} runs measured on this machine "
                 f"({plan.steps} timed training steps per path for the {DECODER} cells, {plan.study_steps} for "
                 f"the others; benchmark data {_counts(images)}); per-tap extraction as one encoder build + "
                 f"measured seconds per sample × the study's {n_all} samples; per run {train_per_run} training "
                 f"samples (study.epochs × study.samples_per_epoch) and {eval_per_run} evaluation samples "
                 "(val every epoch + test); naive evaluation = cached-path decoder inference + the encoder's "
                 "measured forward time per sample; unmeasured runs and taps take the mean per-sample time of "
                 "the measured ones on the same path"),
        "runs": len(rows),
        "study_counts": counts,
        "train_samples_per_run": train_per_run,
        "eval_samples_per_run": eval_per_run,
        "featinv_seconds": featinv_total,
        "featinv_extract_seconds": sum(extract_seconds.values()),
        "featinv_runs_seconds": featinv_runs,
        "naive_seconds": naive_runs,
        "extract_seconds_per_tap": extract_seconds,
        "measured_cells": [
            {"encoder": e, "fusion": f, "decoder": d,
             **{k: c[k] for k in ("cache_speedup", "train_samples_per_s_cache", "train_samples_per_s_naive",
                                  "eval_samples_per_s_cache")}}
            for (e, f, d), c in cells.items()
        ],
        "per_run": rows,
    }


def memory_figure(plan: Plan, work: Path) -> dict:
    """Figure 6: peak RSS of ``train_decoder`` on N and ~8N samples, streaming (``ram_cache_gb=0``) and RAM-cached.

    Each measurement is a fresh process (``benchmarks.peak_rss``) that reports
    its own peak RSS when training is done.  ``RUSAGE_CHILDREN`` in the parent
    is no use here: it is the maximum over *all* children so far, and each
    child's ``ru_maxrss`` starts at the parent's RSS at fork time.
    """
    sizes, peak = {}, {"stream": {}, "ram": {}}
    baseline = _peak_rss_mb(None)
    for label, views in zip(("N", "8N"), plan.memory_views):
        data = dataclasses.replace(plan.data, train_views=views)
        images = _prepared(data, work.parent)
        features = work / f"views{views}" / "features"
        log.info("memory: extracting %s for %s-views images", MEMORY_TAP, views)
        extract_features(images, MEMORY_TAP, store_path(features, MEMORY_TAP),
                         ExtractConfig(weights="random", weights_seed=WEIGHTS_SEED, device="cpu",
                                       batch_size=plan.extract_batch), splits=("train", "val"))
        sizes[label] = ImageStore(images).count("train")
        for mode, ram_gb in (("stream", 0.0), ("ram", TrainConfig().ram_cache_gb)):
            cfg = Config(seed=SEED, data=data, taps=(MEMORY_TAP,), encoder=MEMORY_TAP, decoder=DECODER,
                         extract=ExtractConfig(weights="random", weights_seed=WEIGHTS_SEED, device="cpu"),
                         train=TrainConfig(epochs=1, batch_size=BATCH, lr=LR, device="cpu", ram_cache_gb=ram_gb,
                                           samples_per_epoch=plan.memory_samples_per_epoch,
                                           loss=LossConfig(mse=1.0)))
            log.info("memory: train_decoder on %d samples, %s", sizes[label], mode)
            peak[mode][label] = _peak_rss_mb((cfg, images, features, work / f"run-views{views}-{mode}"))
    feature_mb = {k: n * int(np.prod(resolve_tap(MEMORY_TAP).shape)) * 2 / 2**20 for k, n in sizes.items()}
    return {
        "tap": MEMORY_TAP,
        "method": "peak RSS (VmHWM) of a fresh process running train_decoder "
                  f"(1 epoch of {plan.memory_samples_per_epoch} samples + validation); baseline: the same process "
                  "importing featinv.training.train only",
        "train_samples": sizes,
        "feature_mb": feature_mb,
        "baseline_mb": baseline,
        "peak_rss_mb": peak,
        "ratio_8n_over_n": {m: peak[m]["8N"] / peak[m]["N"] for m in peak},
        "growth_mb": {m: peak[m]["8N"] - peak[m]["N"] for m in peak},
    }


def scaling_figure(plan: Plan, images: Path, features: Path, encoder: TapEncoder, work: Path, cfg: ExtractConfig,
                   device: torch.device, ram_cache_gb: float) -> dict:
    """Figure 7: training samples/s (from the cache) and extraction images/s vs batch size."""
    log.info("scaling with batch size")
    store = FeatureStore(store_path(features, SCALING_TAP))
    pixels = ImageStore(images).pixels("train")
    paths = [(_fresh_model([store.spec], DECODER, None, device),
              FeatureBatches([store.split("train")], pixels, batch, shuffle=True, seed=SEED,
                             ram_cache_gb=ram_cache_gb, drop_last=True),
              lambda feats, pixels01: decoder_inputs(feats, device))
             for batch in plan.train_batches]
    train = dict(zip(plan.train_batches, _train_rates(paths, plan.warmup, plan.steps, device)))
    extract = {}
    for batch in plan.extract_batches:
        out = store_path(work / f"batch{batch}", SCALING_TAP)
        remove_tree(out)
        remove_tree(partial_path(out))
        with _reusing(encoder):  # the build is the same at every batch size
            report = extract_features(images, SCALING_TAP, out, dataclasses.replace(cfg, batch_size=batch),
                                      splits=("train",))
        extract[batch] = report.computed / report.seconds
    return {"tap": SCALING_TAP, "train_samples_per_s": train, "extract_images_per_s": extract}


# ------------------------------------------------------------------------------------ helpers


def _fresh_model(specs, decoder: str, fusion: str | None, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(SEED)  # both paths start from the same decoder
    return build_reconstructor(specs, decoder, fusion, 224).to(device)


def _train_rates(paths: list[tuple], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Training samples/s of each ``(model, batches, features_of)`` path, stepping them in turn.

    Interleaving makes load bursts on a shared machine hit every path alike.
    Each step is timed from fetching its batch to the end of the optimizer
    step (loader time included); the first ``warmup`` steps of each path are
    not counted.  ``features_of(feats, pixels01)`` gives the decoder's inputs:
    the cached features, or the encoder's output on the pixels.
    """
    criterion = ReconstructionLoss(LossConfig(mse=1.0)).to(device)
    runs = [(model.train(), build_optimizer(model, LR, device), _cycle(batches), features_of)
            for model, batches, features_of in paths]
    seconds, samples = [0.0] * len(runs), [0] * len(runs)
    try:
        for step in range(warmup + steps):
            for k, (model, optimizer, stream, features_of) in enumerate(runs):
                _sync(device)
                start = time.perf_counter()
                feats, pixels01 = next(stream)
                pixels01 = pixels01.to(device, non_blocking=True)
                training_step(model, optimizer, criterion, features_of(feats, pixels01), pixels01)
                _sync(device)
                if step >= warmup:
                    seconds[k] += time.perf_counter() - start
                    samples[k] += pixels01.shape[0]
    finally:
        for _, _, stream, _ in runs:
            stream.close()
    return [n / t for n, t in zip(samples, seconds)]


def _eval_rate(model, batches: FeatureBatches, n_batches: int, device: torch.device) -> float:
    """Decoder inference samples/s from the cache (one untimed batch first)."""
    model.eval()
    stream = _cycle(batches)
    try:
        with torch.no_grad():
            feats, _ = next(stream)
            model([f.to(device) for f in feats])
            _sync(device)
            start, seen = time.perf_counter(), 0
            for _ in range(n_batches):
                feats, _ = next(stream)
                seen += model([f.to(device) for f in feats]).shape[0]
        _sync(device)
        return seen / (time.perf_counter() - start)
    finally:
        stream.close()


def _delivery_rate(batches: FeatureBatches, min_batches: int) -> float:
    """Samples/s the loader delivers over whole epochs (at least ``min_batches`` batches), no training."""
    start, seen, delivered = time.perf_counter(), 0, 0
    while delivered < min_batches:
        for _, pixels01 in batches:
            seen += pixels01.shape[0]
            delivered += 1
    if pixels01.is_cuda:  # the last batches' gathers and copies are queued, not done
        torch.cuda.synchronize(pixels01.device)
    return seen / (time.perf_counter() - start)


def _pure_forward_seconds(encoder: TapEncoder, images: Path, batch_size: int, device: torch.device) -> float:
    """The encoder's forward alone over extraction's batches: pixels already on the device, no I/O."""
    store = ImageStore(images)
    batches = []
    for split in SPLITS:
        pixels = torch.from_numpy(np.asarray(store.pixels(split)[:]))
        for begin in range(0, pixels.shape[0], batch_size):
            batch = pixels[begin : begin + batch_size].to(device).permute(0, 3, 1, 2).float().div_(255.0)
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            batches.append(batch)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")  # as extraction does
    with torch.inference_mode(), autocast:
        encoder(batches[0])  # warm-up
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            encoder(batch)
        _sync(device)
    return time.perf_counter() - start


def _reusing(encoder: TapEncoder):
    """``extract_features`` with an already-built encoder instead of building its own."""
    return mock.patch.object(feature_store, "build_encoder", lambda *args, **kwargs: encoder)


@contextlib.contextmanager
def _keeping_encoder() -> Iterator[dict]:
    """``extract_features`` builds its encoder as usual; keep it and its build time."""
    kept: dict = {}

    def build(*args, **kwargs):
        start = time.perf_counter()
        kept["encoder"] = build_encoder(*args, **kwargs)
        kept["build_seconds"] = time.perf_counter() - start
        return kept["encoder"]

    with mock.patch.object(feature_store, "build_encoder", build):
        yield kept


def _cycle(batches: FeatureBatches) -> Iterator:
    while True:
        yield from batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepared(data: DataConfig, work: Path) -> Path:
    """The prepared image store for ``data``, made once per work dir (not timed)."""
    path = work / "images" / f"{digest(dataclasses.asdict(data))[:12]}.zarr"
    if not (path / "zarr.json").is_file():
        prepare_images(data, SEED, path)
    return path


def _counts(images: Path) -> dict[str, int]:
    store = ImageStore(images)
    return {s: store.count(s) for s in SPLITS}


def _study_counts(params: Config) -> dict[str, int]:
    """Samples per split of the study's data (params.yaml ``data``), without preparing it."""
    pools = collect_images(params.data, params.seed)
    return {s: len(pools[s]) * (params.data.train_views if s == "train" else 1) for s in SPLITS}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _peak_rss_mb(job: tuple | None) -> float:
    """Peak RSS (MB) of a fresh ``python -m benchmarks.peak_rss`` process running ``train_decoder(*job)``."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.peak_rss"], input=pickle.dumps(job),
                          capture_output=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.peak_rss failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])["peak_rss_mb"]


def _rounded(obj):
    """4 significant digits for floats; JSON keys as strings."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------ tables


def _print_taps(taps: dict[str, dict], device: torch.device) -> None:
    rows = [{"tap": t, **r} for t, r in taps.items()]
    print(f"\n## Per tap ({device.type})\n")
    print(table(rows, ["tap", "cache_speedup", "extraction_overhead", "loader_headroom", "loader_headroom_ram",
                       "train_samples_per_s_cache", "train_samples_per_s_naive", "loader_samples_per_s_stream",
                       "extract_seconds", "forward_seconds", "encoder_build_seconds"],
                {k: ".2f" for k in rows[0] if k != "tap"}))
    codec_rows = [{"tap": t, "codec": c, "store_ratio": r["store_ratio"][c], "seconds": r["store_extract_seconds"][c],
                   "kB_per_sample": r["store_bytes_per_sample"][c] / 1e3}
                  for t, r in taps.items() for c in CODECS]
    print(f"\n## Store size per codec, test split ({device.type})\n")
    print(table(codec_rows, ["tap", "codec", "store_ratio", "kB_per_sample", "seconds"],
                {"store_ratio": ".3f", "kB_per_sample": ".0f", "seconds": ".2f"}), flush=True)


def _print_study(study: dict, device: torch.device) -> None:
    print(f"\n## Study estimate ({device.type}, extrapolated: {study['runs']} runs)\n")
    rows = [{"path": "featinv (extract once + train from cache)", "extract_s": study["featinv_extract_seconds"],
             "runs_s": study["featinv_runs_seconds"], "total_s": study["featinv_seconds"]},
            {"path": "encoder in the loop", "extract_s": 0.0, "runs_s": study["naive_seconds"],
             "total_s": study["naive_seconds"]}]
    print(table(rows, ["path", "extract_s", "runs_s", "total_s"], {k: ".0f" for k in ("extract_s", "runs_s",
                                                                                        "total_s")}))
    print(f"\nstudy_speedup = {study['study_speedup']:.2f} (measured cells: {len(study['measured_cells'])})",
          flush=True)


def _print_memory(memory: dict) -> None:
    print(f"\n## Peak RSS of the train stage ({memory['tap']}; baseline {memory['baseline_mb']:.0f} MB)\n")
    rows = [{"size": k, "train_samples": memory["train_samples"][k], "feature_mb": memory["feature_mb"][k],
             "stream_mb": memory["peak_rss_mb"]["stream"][k], "ram_mb": memory["peak_rss_mb"]["ram"][k]}
            for k in memory["train_samples"]]
    rows.append({"size": "8N / N", "stream_mb": memory["ratio_8n_over_n"]["stream"],
                 "ram_mb": memory["ratio_8n_over_n"]["ram"]})
    print(table(rows, ["size", "train_samples", "feature_mb", "stream_mb", "ram_mb"],
                {"feature_mb": ".0f", "stream_mb": ".2f", "ram_mb": ".2f"}), flush=True)


def _print_scaling(scaling: dict, device: torch.device) -> None:
    print(f"\n## Scaling with batch size ({scaling['tap']}, {device.type})\n")
    train = [{"batch": b, "train_samples_per_s": v} for b, v in scaling["train_samples_per_s"].items()]
    extract = [{"batch": b, "extract_images_per_s": v} for b, v in scaling["extract_images_per_s"].items()]
    print(table(train, ["batch", "train_samples_per_s"], {"train_samples_per_s": ".2f"}))
    print()
    print(table(extract, ["batch", "extract_images_per_s"], {"extract_images_per_s": ".2f"}), flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f}s")
