"""GPU benchmark: featinv on one GPU at full speed, and the study at DIV2K scale.

Seven sections, each written into the JSON as soon as it is done, so a run that is cut
short still leaves its data; ``--budget-seconds`` caps the whole run (a section that would
start after it is recorded as skipped, and the study stops timing cells and extrapolates).

1. ``startup``: a study cell's fixed cost. Fresh processes time what importing
   ``pipeline.study_run`` costs (torch, featinv's training and evaluation modules, the
   rest), what ``torch._dynamo`` adds (every ``Adam.step`` imports it) and CUDA's
   initialisation; then one whole tiny cell (``python -m pipeline.study_run``) is timed.
2. ``extract``: encoder forward images/s for vgg16/block1, vgg16/block3 and
   vit_small/block3, float32 vs bf16 autocast, at several batch sizes; plus what the
   library's ``extract_features`` achieves (compression and writes included).
3. ``train``: training samples/s from the cache vs with the encoder in the loop, for
   transposed_conv and local_mlp on vgg16/block1 and vgg16/block3, float32 vs bf16 (and
   bf16 without the loss's per-step host sync, to show what that sync costs).
4. ``loader``: samples/s ``FeatureBatches`` delivers onto the device (streaming with one
   and several read threads; RAM-cached) ÷ samples/s the bf16 training step consumes.
5. ``study``: the published study's 44 cells at DIV2K scale (2,560 cached training
   views, 160 val, 100 test; 30 epochs; its loss, 0.5·MSE + 0.5·LPIPS; loader mode as
   ``train.ram_cache_gb`` would pick there) on synthetic pixels (``pack`` trains with the same
   loss): every cell timed for a few hundred steps and extrapolated,
   plus the 8 extractions of 2,820 images, against the published study's 18 GPU-hours.
6. ``limit``: per tap, the cache speedup's physical limit — (encoder forward + decoder
   step) ÷ decoder step, from per-part timings and from counted FLOPs — next to the
   speedup achieved, all measured in one interleaved loop; reports achieved ÷ limit.
7. ``compile``: ``torch.compile`` vs eager for the cached step in
   featinv's precision (bf16 on CUDA, float32 on a CPU): compilation seconds, steady rates,
   and the steps a study cell needs before it pays.  On the CPU plan, ``limit`` also times
   the achieved speedup with the decoder compiled.

    python -m benchmarks.gpu            # on a GPU: ≤ 8 min on one H100 → benchmarks/results/gpu.json
    python -m benchmarks.gpu --dry      # CPU, toy sizes: the CI smoke test
    python -m benchmarks.gpu --plan cpu --sections startup,limit --out benchmarks/results/gpu_cpu.json

Encoder weights are random (seed 0; ImageNet weights cost the same time). The
precisions compared in ``extract`` and ``train`` are explicit autocast settings (on the
CPU, bf16 is CPU autocast: the measurement behind keeping float32 there); the study,
``limit`` and ``compile`` use featinv's own policy (``featinv.precision``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import run
from benchmarks.common import RESULTS, WORK, machine, table, write_json
from featinv import precision
from featinv.config import Config, DataConfig, ExtractConfig, LossConfig, load_params, with_overrides
from featinv.presets import preset_overrides
from featinv.store.feature_store import FeatureStore, store_path
from featinv.data.image_store import ImageStore
from featinv.store.loader import FeatureBatches
from featinv.training.losses import ReconstructionLoss, lpips_available
from featinv.study.grid import plan_runs
from featinv.encoders.taps import TapEncoder, resolve_tap
from featinv.training.step import build_optimizer, training_step
from featinv.training.train import decoder_inputs, run_taps
from featinv.zarr_utils import remove_tree

__all__ = ["Plan", "GPU", "CPU", "DRY", "SECTIONS", "main"]

log = logging.getLogger("benchmarks.gpu")

# The published protocol at DIV2K scale.
DIV2K_TRAIN = 2_560  # 640 training images × 4 cached views
DIV2K_VAL = 160
DIV2K_TEST = 100
DIV2K_IMAGES = DIV2K_TRAIN + DIV2K_VAL + DIV2K_TEST  # 2,820: what each tap's extraction runs over
EPOCHS = 30
PUBLISHED_GPU_HOURS = 18.0  # RTX 6000 Ada, encoder recomputed at every step
CELL_STEPS = EPOCHS * DIV2K_TRAIN // run.BATCH  # training steps of one study cell

SECTIONS = ("startup", "extract", "train", "loader", "pack", "study", "limit", "compile")
PRECISIONS = ("fp32", "bf16")
SYNTHETIC_SIDE = 256  # = data.resize: the images need no resizing
CHILD_TIMEOUT = 300  # seconds for one start-up child process
# Where a study cell's seconds go: (path suffix, function) → label, read from its cProfile.
PROFILED = {
    ("pipeline/common.py", "run"): "stage main (all but module imports)",
    ("torch/_dynamo/__init__.py", "<module>"): "import torch._dynamo (first Adam)",
    ("featinv/training/train.py", "open_feature_stores"): "open feature stores",
    ("featinv/store/loader.py", "__init__"): "FeatureBatches set-up (RAM load)",
    ("featinv/training/train.py", "train_decoder"): "train_decoder",
    ("featinv/training/train.py", "_validate"): "validation",
    ("featinv/training/model.py", "save_checkpoint"): "save_checkpoint",
    ("featinv/training/train.py", "_annotate"): "re-save best.pt (_annotate)",
    ("featinv/evaluation/evaluate.py", "evaluate_run"): "evaluate_run",
    ("featinv/training/model.py", "load_checkpoint"): "load_checkpoint",
    ("featinv/evaluation/metrics.py", "__init__"): "LPIPS metric set-up",
    ("featinv/evaluation/metrics.py", "image_metrics"): "PSNR/SSIM",
    ("featinv/evaluation/evaluate.py", "_write_grid"): "comparison grid PNG",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much one run measures."""

    name: str
    train_images: int  # synthetic training images (a fifth become val), train_views views each
    test_images: int
    train_views: int
    batch: int  # training batch size (the published 4)
    extract_batch: int  # extract_features' batch size for the benchmark's stores
    extract_taps: tuple[str, ...]
    extract_batches: tuple[int, ...]  # forward batch sizes timed in `extract`
    extract_rounds: int  # timed batches per setting
    # the first extract tap's warm library extraction is also timed with these codecs (the default's row is there)
    extract_codecs: tuple[str, ...]
    train_taps: tuple[str, ...]
    train_decoders: tuple[str, ...]
    warmup: int  # untimed steps per path
    steps: int  # timed steps per path
    block: int  # consecutive steps between device syncs (1: every step timed on its own)
    loader_taps: tuple[str, ...]
    loader_threads: tuple[int, ...]  # read threads tried when streaming
    loader_min_batches: int
    study_steps: int  # timed steps per study cell, at most
    study_cell_seconds: float  # and at most this many timed seconds
    study_cells: int | None  # None: every cell
    limit_taps: tuple[str, ...] | None  # None: every study tap
    limit_steps: int
    compile_cases: tuple[tuple[str, str], ...]  # (tap, decoder)
    budget_seconds: float
    # `pack`: K study cells training at once on one device (separate processes), per (tap, decoder).
    pack_cases: tuple[tuple[str, str], ...] = ()
    pack_workers: tuple[int, ...] = (1,)
    # "policy": featinv.precision's (bf16 autocast on CUDA); "fp32": none (TF32 where cuDNN/cuBLAS allow it)
    pack_precisions: tuple[str, ...] = ("policy",)
    pack_warm_seconds: float = 3.0  # per window: build the cell and warm up (cuDNN autotuning) ...
    pack_seconds: float = 5.0  # ... then count the samples trained in this many seconds
    startup_profile: bool = True  # time the tiny cell a second time under cProfile, for the breakdown
    fp16_error: bool = True  # also the error of float16 autocast (slow on a CPU: ~1 min for vgg16/block3)
    limit_compile: bool = False  # `limit` also times both paths with the decoder under torch.compile


GPU = Plan("gpu", train_images=80, test_images=8, train_views=4, batch=run.BATCH, extract_batch=256,
           extract_taps=("vgg16/block1", "vgg16/block3", "vit_small/block3"), extract_batches=(16, 64, 256),
           extract_rounds=10, extract_codecs=("lz4", "none"), train_taps=("vgg16/block1", "vgg16/block3"),
           train_decoders=("transposed_conv", "local_mlp"), warmup=10, steps=100, block=10,
           loader_taps=("vgg16/block1", "vgg16/block3"), loader_threads=(1, 4), loader_min_batches=128,
           study_steps=200, study_cell_seconds=3.0, study_cells=None, limit_taps=None, limit_steps=60,
           compile_cases=(("vgg16/block1", "transposed_conv"), ("vgg16/block1", "local_mlp")),
           pack_cases=tuple(("vgg16/block1", d)
                            for d in ("transposed_conv", "frequency_aware", "wavelet", "attention")),
           pack_workers=(1, 8), pack_precisions=("policy",), pack_warm_seconds=3.0, pack_seconds=4.0,
           budget_seconds=450)
# The CPU's own figures (start-up, achieved vs limit): the same sections, sized for 2 cores.
CPU = dataclasses.replace(GPU, name="cpu", train_images=5, test_images=1, extract_batch=8, extract_batches=(4, 16),
                          extract_rounds=2, extract_codecs=(), warmup=2, steps=6, block=1,
                          loader_taps=("vgg16/block1",),
                          loader_threads=(1, 2), loader_min_batches=40, study_steps=4, study_cell_seconds=10.0,
                          limit_steps=8, limit_compile=True,
                          compile_cases=(("vgg16/block1", "transposed_conv"), ("vgg16/block3", "transposed_conv"),
                                         ("resnet34/layer1", "transposed_conv"), ("resnet34/layer2", "transposed_conv"),
                                         ("vgg16/block1", "frequency_aware"), ("vgg16/block1", "wavelet"),
                                         ("vgg16/block1", "attention")),
                          pack_cases=(("vgg16/block1", "transposed_conv"),),
                          pack_workers=(1, 2), pack_precisions=("policy",), pack_warm_seconds=8.0, pack_seconds=10.0,
                          budget_seconds=1800)
DRY = dataclasses.replace(CPU, name="dry", test_images=1, train_views=2, batch=2, extract_batch=4,
                          extract_taps=("vgg16/block1",), extract_batches=(2,), extract_rounds=1,
                          extract_codecs=("none",), train_taps=("vgg16/block1",), train_decoders=("transposed_conv",),
                          warmup=1, steps=1, loader_min_batches=4, study_steps=1,
                          study_cells=1, limit_taps=("vgg16/block1",), limit_steps=2, limit_compile=False,
                          compile_cases=(("vgg16/block1", "transposed_conv"),), budget_seconds=240,
                          pack_warm_seconds=2.0, pack_seconds=1.0, startup_profile=False, fp16_error=False)
PLANS = {p.name: p for p in (GPU, CPU, DRY)}


class _Amp(nn.Module):
    """``model``'s forward under ``context()``, its output in float32 (losses and metrics see that)."""

    def __init__(self, model: nn.Module, context: Callable[[], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        self.model = model
        self.context = context

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        with self.context():
            out = self.model(feats)
        return precision.float32(out)


class _Trainer:
    """One training path: a fresh (seeded) model, Adam, a loader, and where the model's inputs come from.

    ``inputs_of(feats, pixels01)`` gives the decoder's inputs: the cached features, or the
    encoders' output on the pixels.  ``step()`` is the training loop's step
    (:func:`featinv.training.step.training_step`, autocast from ``context``) and returns the
    samples it trained on.
    """

    def __init__(self, specs, decoder: str, fusion: str | None, batches, inputs_of: Callable, context: Callable,
                 device: torch.device, criterion: nn.Module | None = None, compile_model: bool = False) -> None:
        model = run._fresh_model(specs, decoder, fusion, device)
        # torch.compile is measured here only: in featinv's training step it paid on no device
        # enough to be worth a per-process compile (BENCHMARKS.md, "torch.compile on the CPU").
        self.model = _Amp(torch.compile(model) if compile_model else model, context).train()
        self.optimizer = build_optimizer(model, run.LR, device)
        self.criterion = criterion or ReconstructionLoss(LossConfig(mse=1.0)).to(device)
        self.batches, self.inputs_of, self.device = batches, inputs_of, device
        self.stream = run._cycle(batches)

    def step(self) -> int:
        feats, pixels01 = next(self.stream)
        pixels01 = pixels01.to(self.device, non_blocking=True)
        training_step(self.model, self.optimizer, self.criterion, self.inputs_of(feats, pixels01), pixels01)
        return pixels01.shape[0]

    def close(self) -> None:
        self.stream.close()


class _Stores:
    """The benchmark's feature stores, each extracted on first use by the library (and timed)."""

    def __init__(self, images: Path, work: Path, cfg: ExtractConfig, device: torch.device) -> None:
        self.images, self.dir, self.cfg, self.device = images, work / "features", cfg, device
        self.reports: dict[str, dict] = {}
        self.warm_reports: dict[str, dict] = {}  # a second extraction in this (warm) process: `extract`
        self.encoders: dict[str, TapEncoder] = {}

    def get(self, tap: str) -> FeatureStore:
        if tap not in self.reports:
            log.info("extracting %s (%d images, batch %d)", tap, sum(run._counts(self.images).values()),
                     self.cfg.batch_size)
            row, encoder = run.extraction_overhead(self.images, tap, store_path(self.dir, tap), self.cfg, self.device)
            self.reports[tap], self.encoders[tap] = row, precision.channels_last(encoder, self.device)
        return FeatureStore(store_path(self.dir, tap))

    def encoder(self, tap: str) -> TapEncoder:
        self.get(tap)
        return self.encoders[tap]


@dataclasses.dataclass
class _Context:
    """What every section gets."""

    plan: Plan
    params: Config
    data: DataConfig  # what `images` was prepared from
    images: Path
    stores: _Stores
    device: torch.device
    work: Path
    deadline: float
    sections: dict  # results so far (the loader reads the training rates)
    save: Callable[[], None]  # writes the JSON as it stands

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, toy sizes (the CI smoke test); same as --plan dry")
    p.add_argument("--plan", choices=sorted(PLANS), help="sizes (default: gpu on CUDA, else cpu)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-seconds", type=float, help="stop starting work after this long (default: the plan's)")
    p.add_argument("--work", type=Path, default=WORK / "gpu", help="scratch dir for images, stores and runs")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    p.add_argument("--rescore", type=Path, metavar="JSON",
                   help="re-derive a saved result's pack speedups and packed study estimate; measure nothing")
    args = p.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("featinv").setLevel(logging.WARNING)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and not args.dry
                                                               and torch.cuda.is_available()) else "cpu")
    plan = PLANS["dry" if args.dry else args.plan or ("gpu" if device.type == "cuda" else "cpu")]
    budget = args.budget_seconds if args.budget_seconds is not None else plan.budget_seconds
    start = time.perf_counter()
    deadline = start + budget
    precision.setup(device)
    result = {
        "command": " ".join(["python -m benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)]),
        "plan": dataclasses.asdict(plan),
        "environment": _environment(device),
        "budget_seconds": budget,
        "sections": {},
    }

    def save() -> None:
        result["elapsed_seconds"] = time.perf_counter() - start
        result["environment"]["loadavg_end"] = list(os.getloadavg())
        write_json(args.out, run._rounded(result))

    params = _published_study_params()
    data = _synthetic_data(plan, args.work)
    images = run._prepared(data, args.work)
    result["counts"] = run._counts(images)
    stores = _Stores(images, args.work, ExtractConfig(weights="random", weights_seed=run.WEIGHTS_SEED,
                                                      device=str(device), batch_size=plan.extract_batch), device)
    context = _Context(plan, params, data, images, stores, device, args.work, deadline, result["sections"], save)
    for name in sections:
        if time.perf_counter() > deadline:
            result["sections"][name] = {"skipped": f"the {budget:.0f} s budget was spent"}
            log.warning("skipping %s: budget spent", name)
            continue
        log.info("== %s (%.0f s left)", name, deadline - time.perf_counter())
        t0 = time.perf_counter()
        try:
            result["sections"][name] = SECTION_FUNCTIONS[name](context)
        except Exception as exc:  # recorded and reported; the other sections still run
            log.error("section %s failed:\n%s", name, traceback.format_exc())
            result["sections"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-3000:]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["sections"][name]["section_seconds"] = time.perf_counter() - t0
        save()
    result["stores"] = stores.reports
    result["errors"] = [n for n, s in result["sections"].items() if "error" in s]
    save()
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - start)
    return result


# ------------------------------------------------------------------------------------ sections


def startup_section(ctx: _Context) -> dict:
    """A study cell's fixed cost: imports, torch._dynamo, CUDA initialisation, and one whole tiny cell."""
    device = ctx.device
    probe = (
        "import json, time\n"
        "t = [time.perf_counter()]\n"
        "import torch; t.append(time.perf_counter())\n"
        "import skimage.metrics._structural_similarity; t.append(time.perf_counter())\n"
        "import featinv.evaluation.metrics; t.append(time.perf_counter())\n"
        "import featinv.training.train; t.append(time.perf_counter())\n"
        "import featinv.evaluation.evaluate; t.append(time.perf_counter())\n"
        "import pipeline.study_run; t.append(time.perf_counter())\n"
        "import torch._dynamo; t.append(time.perf_counter())\n"
        f"if {device.type == 'cuda'}:\n"
        "    torch.zeros(1, device='cuda'); torch.cuda.synchronize()\n"
        "t.append(time.perf_counter())\n"
        "print(json.dumps([b - a for a, b in zip(t, t[1:])]))\n"
    )
    started = time.perf_counter()
    parts = json.loads(_child([sys.executable, "-c", probe]).splitlines()[-1])
    probe_wall = time.perf_counter() - started
    names = ("torch", "skimage_ssim_module", "featinv_metrics", "featinv_train", "featinv_evaluate",
             "pipeline_study_run_rest", "torch_dynamo", "cuda_init")
    imports = dict(zip(names, parts))
    bare = _child_seconds([sys.executable, "-c", "pass"])

    # One whole cell on the benchmark's vgg16/block1 store: 1 epoch of 8 samples, then evaluation.
    tap = "vgg16/block1"
    ctx.stores.get(tap)
    cell_dir = ctx.work / "startup"
    params = {
        "seed": run.SEED,
        "data": _plain(dataclasses.asdict(ctx.data)),
        "taps": [tap],
        "extract": _plain(dataclasses.asdict(ctx.stores.cfg)),
        "encoder": tap,
        "decoder": run.DECODER,
        "train": {"device": device.type, "batch_size": 4, "epochs": 1},
        "evaluate": {"device": device.type, "grid_images": 2},
        "study": {"taps": [tap], "decoders": [run.DECODER], "fusions": [], "ensemble_taps": [], "epochs": 1,
                  "samples_per_epoch": 8},
    }
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = cell_dir / "metrics.json"
    metrics.unlink(missing_ok=True)
    cell = [sys.executable, "-m", "pipeline.study_run", "--params", str(cell_dir / "params.yaml"),
            "--images", str(ctx.images), "--features", str(ctx.stores.dir), "--out", str(cell_dir / "run"),
            "--metrics", str(metrics)]
    cell_wall = _child_seconds(cell)
    train_seconds = json.loads(metrics.read_text())["train"]["train_seconds"]
    breakdown = None
    if ctx.plan.startup_profile:  # the same cell again under cProfile: where its seconds go
        profile = cell_dir / "cell.prof"
        profiled_wall = _child_seconds([sys.executable, "-m", "cProfile", "-o", str(profile), *cell[1:]])
        breakdown = {"profiled_wall_seconds": profiled_wall, **_profile_breakdown(profile)}
    out = {
        "python_bare_seconds": bare,
        "import_probe_wall_seconds": probe_wall,
        "import_seconds": imports,
        "cell_wall_seconds": cell_wall,
        "cell_train_seconds": train_seconds,
        "cell_fixed_seconds": cell_wall - train_seconds,
        "cell_profile_seconds": breakdown,
        "cell": "pipeline.study_run, vgg16/block1 + transposed_conv, 1 epoch of 8 samples, evaluation on "
                f"{run._counts(ctx.images)['test']} test images",
        # What could go, per cell, and where (none of it is in the files this benchmark owns).
        "savings_per_cell_seconds": {
            "cells sharing one process (all imports, torch._dynamo, CUDA initialisation)": sum(parts),
            "of which torch._dynamo alone (every Adam.step imports it; no way round it per process)":
                imports["torch_dynamo"],
            "LPIPS set-up when its weights are absent (under cProfile)":
                (breakdown or {}).get("LPIPS metric set-up"),
        },
    }
    print(f"\n## Start-up of a study cell ({device.type})\n")
    print(table([{"part": k, "seconds": v} for k, v in [("python", bare), *imports.items(),
                                                       ("whole tiny cell", cell_wall),
                                                       ("of which training", train_seconds)]],
                ["part", "seconds"], {"seconds": ".2f"}))
    if breakdown:
        print("\nthe cell under cProfile (cumulative seconds, profiler overhead included):\n")
        print(table([{"part": k, "seconds": v} for k, v in breakdown.items()], ["part", "seconds"],
                    {"seconds": ".2f"}))
    print(flush=True)
    return out


def extract_section(ctx: _Context) -> dict:
    """Encoder forward images/s per tap, precision and batch size; the library's extraction rate; autocast's error."""
    rows, errors = [], {}
    for tap in ctx.plan.extract_taps:
        encoder = ctx.stores.encoder(tap)
        library = ctx.stores.reports[tap]
        for prec in PRECISIONS:
            for batch in ctx.plan.extract_batches:
                if ctx.left() < 0:
                    break
                log.info("  forward %s %s batch %d", tap, prec, batch)
                rate = _forward_rate(encoder, batch, _amp(ctx.device, prec), ctx.device, ctx.plan.extract_rounds)
                rows.append({"tap": tap, "precision": prec, "batch": batch, "images_per_s": rate})
        rows.append({"tap": tap, "precision": "library", "codec": ctx.stores.cfg.codec,
                     "batch": ctx.stores.cfg.batch_size,
                     "images_per_s": library["extract_images_per_s"],
                     "extraction_overhead": library["extraction_overhead_without_build"]})
        # Once more in this process: the first extraction also paid CUDA's and cuDNN's first use.
        warm, _ = run.extraction_overhead(ctx.images, tap, store_path(ctx.work / "features-warm", tap),
                                          ctx.stores.cfg, ctx.device)
        ctx.stores.warm_reports[tap] = warm
        rows.append(_warm_library_row(tap, ctx.stores.cfg, warm))
        # The store's codec is the lever on the write side (a vgg16/block1 map is 1.6 MB of float16).
        for codec in ctx.plan.extract_codecs if tap == ctx.plan.extract_taps[0] else ():
            if ctx.left() < 0:
                break
            cfg = dataclasses.replace(ctx.stores.cfg, codec=codec)
            other, _ = run.extraction_overhead(ctx.images, tap, store_path(ctx.work / f"features-{codec}", tap),
                                               cfg, ctx.device)
            remove_tree(ctx.work / f"features-{codec}")
            rows.append(_warm_library_row(tap, cfg, other))
        dtypes = {"bf16": torch.bfloat16} | ({"fp16": torch.float16} if ctx.plan.fp16_error else {})
        errors[tap] = {name: _relative_error(encoder, dtype, ctx.device) for name, dtype in dtypes.items()}
    best = {}
    for tap in ctx.plan.extract_taps:
        timed = {r["precision"]: r["images_per_s"] for r in rows if r["tap"] == tap and r["precision"] in PRECISIONS
                 and r["batch"] == max(ctx.plan.extract_batches)}
        if len(timed) == 2:
            best[tap] = timed["bf16"] / timed["fp32"]
    print(f"\n## Extraction ({ctx.device.type}): encoder forward images/s; `library` = extract_features\n")
    print(table(rows, ["tap", "precision", "codec", "batch", "images_per_s", "images_per_s_without_build",
                       "extraction_overhead"],
                {"images_per_s": ".1f", "images_per_s_without_build": ".1f", "extraction_overhead": ".2f"}),
          flush=True)
    print(f"\nrelative error of the stored (float16) features vs float32: {errors}", flush=True)
    return {"rows": rows, "bf16_over_fp32_at_largest_batch": best, "relative_error_vs_fp32": errors,
            "library_note": "extract_features as the library runs it (its own autocast policy), store writes "
                            "and compression included; extraction_overhead = its time without the encoder build "
                            "÷ the pure forward over the same batches; `library (warm)`: the same extraction "
                            "again in the same process, CUDA and cuDNN's autotuning already set up"}


def _warm_library_row(tap: str, cfg: ExtractConfig, report: dict) -> dict:
    """An `extract` row for a second extraction in this (warm) process, from ``run.extraction_overhead``."""
    return {"tap": tap, "precision": "library (warm)", "codec": cfg.codec, "batch": cfg.batch_size,
            "images_per_s": report["extract_images_per_s"],
            "extraction_overhead": report["extraction_overhead_without_build"],
            "images_per_s_without_build": report["extract_samples"] / (report["extract_seconds"]
                                                                       - report["encoder_build_seconds"])}


def train_section(ctx: _Context) -> dict:
    """Training samples/s from the cache vs the encoder in the loop, per tap, decoder and precision."""
    rows = []
    for tap in ctx.plan.train_taps:
        store, encoder = ctx.stores.get(tap), ctx.stores.encoder(tap)
        for decoder in ctx.plan.train_decoders:
            if ctx.left() < 0:
                break
            log.info("  train %s + %s", tap, decoder)
            paths = {}
            for prec in PRECISIONS:
                paths[f"cache_{prec}"] = _cache_trainer(ctx, [store], decoder, None, _amp(ctx.device, prec))
                paths[f"naive_{prec}"] = _naive_trainer(ctx, store, encoder, decoder, _amp(ctx.device, prec))
            paths["cache_bf16_nosync"] = _cache_trainer(ctx, [store], decoder, None, _amp(ctx.device, "bf16"),
                                                        criterion=_MseNoSync())
            try:
                timed = _timed({k: t.step for k, t in paths.items()}, ctx.plan.warmup, ctx.plan.steps,
                               ctx.plan.block, ctx.device)
            finally:
                for t in paths.values():
                    t.close()
            row = {"tap": tap, "decoder": decoder, "batch": ctx.plan.batch}
            row |= {f"{k}_samples_per_s": v["samples_per_s"] for k, v in timed.items()}
            for prec in PRECISIONS:
                row[f"cache_speedup_{prec}"] = row[f"cache_{prec}_samples_per_s"] / row[f"naive_{prec}_samples_per_s"]
            row["bf16_over_fp32_cache"] = row["cache_bf16_samples_per_s"] / row["cache_fp32_samples_per_s"]
            row["nosync_over_sync_bf16"] = row["cache_bf16_nosync_samples_per_s"] / row["cache_bf16_samples_per_s"]
            rows.append(row)
    print(f"\n## Training samples/s ({ctx.device.type}, batch {ctx.plan.batch})\n")
    print(table(rows, ["tap", "decoder", "cache_fp32_samples_per_s", "naive_fp32_samples_per_s",
                       "cache_bf16_samples_per_s", "naive_bf16_samples_per_s", "cache_speedup_fp32",
                       "cache_speedup_bf16", "bf16_over_fp32_cache", "nosync_over_sync_bf16"],
                {k: ".2f" for k in rows[0] if k not in ("tap", "decoder", "batch")} if rows else {}), flush=True)
    return {"rows": rows, "note": "bf16 = torch.autocast(device, bfloat16) around the forward (CPU autocast on "
                                  "the CPU); nosync = plain MSE instead of ReconstructionLoss, whose float() of "
                                  "each loss part waits for the device every step"}


def loader_section(ctx: _Context) -> dict:
    """Samples/s the loader delivers onto the device ÷ samples/s the bf16 cached step consumes."""
    train_rows = ctx.sections.get("train", {}).get("rows", [])
    rows = []
    for tap in ctx.plan.loader_taps:
        store = ctx.stores.get(tap)
        pixels = ImageStore(ctx.images).pixels("train")
        consumed = next((r["cache_bf16_samples_per_s"] for r in train_rows
                         if r["tap"] == tap and r["decoder"] == run.DECODER), None)
        # ram: gathered on the host, copied over; device: the split held on the GPU (train.device_cache_gb)
        modes = {"ram": (math.inf, 1, 0.0), **{f"stream_{k}_threads": (0.0, k, 0.0) for k in ctx.plan.loader_threads}}
        if ctx.device.type == "cuda":
            modes = {"device": (math.inf, 1, math.inf), **modes}
        row = {"tap": tap, "train_samples_per_s": consumed,
               "div2k_mode": ("device" if _device_cache_gb(ctx.params, ctx.device, [tap]) else "ram")
               if _div2k_bytes([tap]) <= ctx.params.train.ram_cache_gb * 2**30 else "stream"}
        for mode, (ram_gb, threads, held_gb) in modes.items():
            if ctx.left() < 0:
                break
            batches = FeatureBatches([store.split("train")], pixels, ctx.plan.batch, shuffle=True, seed=run.SEED,
                                     ram_cache_gb=ram_gb, device=ctx.device, read_threads=threads,
                                     device_cache_gb=held_gb)
            row[f"{mode}_samples_per_s"] = run._delivery_rate(batches, ctx.plan.loader_min_batches)
            run._sync(ctx.device)
            if consumed:
                row[f"{mode}_headroom"] = row[f"{mode}_samples_per_s"] / consumed
        rows.append(row)
    print(f"\n## Loader onto {ctx.device.type} (headroom = delivered ÷ bf16 transposed_conv step's samples/s)\n")
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r)),
                {k: ".2f" for r in rows for k in r if k.endswith(("_s", "headroom"))}), flush=True)
    return {"rows": rows, "goal": "headroom ≥ 3 in the mode DIV2K would use (`div2k_mode`)"}


def pack_section(ctx: _Context) -> dict:
    """Samples/s of K study cells training at once on one device (K processes), ÷ one cell alone.

    At the published batch of 4 one cell leaves most of a GPU idle; ``featinv study --executor
    dask --workers K`` puts K cells on each GPU. Each worker (``benchmarks.gpu_pack``) is a
    fresh process training one cell from the RAM-cached store with featinv's own precision
    policy and loss; all follow one schedule of windows, so the K cells of a window really
    share the device while they are counted.
    """
    plan = ctx.plan
    if not plan.pack_cases:
        return {"skipped": "no pack cases in this plan"}
    for tap, _ in plan.pack_cases:
        ctx.stores.get(tap)
    folder = ctx.work / "pack"
    remove_tree(folder)
    folder.mkdir(parents=True)
    windows, at = [], 0.0
    for tap, decoder in plan.pack_cases:
        for prec in plan.pack_precisions:
            for workers in plan.pack_workers:
                windows.append({"taps": [tap], "decoder": decoder, "fusion": None, "precision": prec,
                                "held_on_device": bool(_device_cache_gb(ctx.params, ctx.device, [tap])),
                                "workers": workers, "warm_at": at, "measure_at": at + plan.pack_warm_seconds,
                                "end_at": at + plan.pack_warm_seconds + plan.pack_seconds})
                at = windows[-1]["end_at"] + 0.5  # a gap: one window's stragglers stay out of the next
    most = max(plan.pack_workers)
    config = {"device": str(ctx.device), "images": str(ctx.images), "features": str(ctx.stores.dir),
              "batch": plan.batch, "threads": max(1, (os.cpu_count() or 1) // most), "warm_steps": PACK_WARM_STEPS,
              "loss": dataclasses.asdict(ctx.params.train.loss), "windows": windows}
    (folder / "config.json").write_text(json.dumps(config))
    log.info("  %d workers, %d windows (%.0f s)", most, len(windows), at)
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_pack", "--config", str(folder / "config.json"),
                               "--slot", str(slot)], cwd=run.REPO, stderr=subprocess.PIPE, text=True)
             for slot in range(most)]
    try:
        deadline = time.time() + CHILD_TIMEOUT
        while not all((folder / f"ready-{slot}").exists() for slot in range(most)):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                raise RuntimeError("a pack worker did not start: " + (failed[0].stderr.read()[-2000:] if failed
                                                                        else f"none ready in {CHILD_TIMEOUT} s"))
            time.sleep(0.1)
        go = folder / "go.tmp"
        go.write_text(repr(time.time() + 1.0))
        go.rename(folder / "go")  # whole, never half-written
        for p in procs:
            _, err = p.communicate(timeout=at + CHILD_TIMEOUT)
            if p.returncode != 0:
                raise RuntimeError(f"a pack worker failed (exit {p.returncode}): {err[-2000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads((folder / f"result-{slot}.json").read_text()) for slot in range(most)]
    rows = []
    for index, window in enumerate(windows):
        mine = [r for slot in results for r in slot if r["window"] == index]
        rows.append({"tap": window["taps"][0], "decoder": window["decoder"], "precision": window["precision"],
                     "workers": window["workers"], "samples_per_s": sum(r["samples"] / r["seconds"] for r in mine),
                     "late_seconds": max(r["late_seconds"] for r in mine)})
    best = pack_speedups(rows, plan.pack_seconds)
    print(f"\n## Study cells sharing one {ctx.device.type} device (batch {plan.batch}; K processes)\n")
    print(table(rows, ["tap", "decoder", "precision", "workers", "samples_per_s", "valid", "speedup", "efficiency",
                       "late_seconds"],
                {"samples_per_s": ".1f", "speedup": ".2f", "efficiency": ".2f", "late_seconds": ".2f"}), flush=True)
    return {"rows": rows, "best_by_decoder": best, "threads_per_worker": config["threads"],
            **loss_note(ctx.params.train.loss),
            "note": f"each window: {plan.pack_warm_seconds:.0f} s to build the cell and warm up, then the samples "
                    f"trained in {plan.pack_seconds:.0f} s, summed over the K workers' own rates; late_seconds: "
                    "how late the slowest worker began counting (a worker still warming up); a window with "
                    f"late_seconds > {PACK_LATE_FRACTION:.0%} of the counting time is not valid (its workers did "
                    "not share the device while counted) and gives no speedup"}


PACK_WARM_STEPS = 5  # steps of each of its cells a pack worker trains before it reports ready (cuDNN autotuning)
PACK_LATE_FRACTION = 0.25  # a pack window whose slowest worker began counting later than this is not a measurement


def pack_speedups(rows: list[dict], pack_seconds: float) -> dict[str, dict]:
    """Mark each ``pack`` row valid or not, add its speedup over one cell alone; the best valid one per decoder.

    The speedup of K cells (in either precision) is over one cell alone as featinv runs it
    (precision "policy"): what the study's per-run seconds were measured as. A row is valid
    when its slowest worker began counting within :data:`PACK_LATE_FRACTION` of the counting
    time: otherwise the workers did not share the device while they were counted
    (one was still building its cell or autotuning), and the sum of their rates means nothing.
    A decoder without a valid one-worker row and a valid K-worker row is left out (the study
    then counts no speedup for it).
    """
    for row in rows:
        row["valid"] = row["late_seconds"] <= PACK_LATE_FRACTION * pack_seconds
    best: dict[str, dict] = {}
    for row in rows:
        alone = next((r for r in rows if (r["tap"], r["decoder"]) == (row["tap"], row["decoder"])
                      and r["workers"] == 1 and r.get("precision", "policy") == "policy" and r["valid"]), None)
        row["speedup"] = row["samples_per_s"] / alone["samples_per_s"] if alone and row["valid"] else None
        row["efficiency"] = row["speedup"] / row["workers"] if row["speedup"] is not None else None
        if row["speedup"] is not None and row is not alone and (
                row["decoder"] not in best or row["speedup"] > best[row["decoder"]]["speedup"]):
            best[row["decoder"]] = {"workers": row["workers"], "precision": row.get("precision", "policy"),
                                    "speedup": row["speedup"]}
    return best


def study_section(ctx: _Context) -> dict:
    """The 44-cell study at DIV2K scale: every cell timed on the cache, extrapolated; extraction added."""
    params, plan, device = ctx.params, ctx.plan, ctx.device
    runs = plan_runs(params)
    startup = ctx.sections.get("startup", {}).get("cell_fixed_seconds")
    bench_train = run._counts(ctx.images)["train"]
    pixels = ImageStore(ctx.images).pixels("train")
    val_pixels = ImageStore(ctx.images).pixels("val")
    criterion, protocol_note = protocol_loss(params.train.loss, device)
    out = {"protocol": {"train": DIV2K_TRAIN, "val": DIV2K_VAL, "test": DIV2K_TEST, "epochs": EPOCHS,
                        "batch": plan.batch, "precision": "featinv.precision (bf16 autocast on CUDA only)",
                        "ram_cache_gb": params.train.ram_cache_gb} | protocol_note,
           "cells": []}
    encoder_per_sample: dict[str, float] = {}
    ram_load_per_sample: dict[str, float] = {}
    for cell in runs:
        if plan.study_cells is not None and len(out["cells"]) >= plan.study_cells:
            break
        if ctx.left() < 0:
            log.warning("budget spent after %d study cells: the rest are extrapolated", len(out["cells"]))
            break
        cfg = dataclasses.replace(params, encoder=cell.encoder, fusion=cell.fusion, decoder=cell.decoder)
        taps = run_taps(cfg)
        log.info("  cell %s + %s", cell.label, cell.decoder)
        stores = [ctx.stores.get(t) for t in taps]
        in_ram = _div2k_bytes(taps) <= params.train.ram_cache_gb * 2**30
        held = _device_cache_gb(params, device, taps) if in_ram else 0.0
        for tap, store in zip(taps, stores):
            if tap not in encoder_per_sample:  # the encoder in the loop would cost this per sample
                encoder_per_sample[tap] = 1 / _forward_rate(ctx.stores.encoder(tap), plan.batch,
                                                            lambda: precision.autocast(device), device, 3)
            if in_ram and tap not in ram_load_per_sample:
                t0 = time.perf_counter()
                FeatureBatches([store.split("train")], pixels, plan.batch, ram_cache_gb=math.inf)
                ram_load_per_sample[tap] = (time.perf_counter() - t0) / bench_train
        batches = FeatureBatches([s.split("train") for s in stores], pixels, plan.batch, shuffle=True, seed=run.SEED,
                                 ram_cache_gb=math.inf if in_ram else 0.0, drop_last=True, device=device,
                                 device_cache_gb=held)
        trainer = _cache_trainer(ctx, stores, cell.decoder, cell.fusion, lambda: precision.autocast(device),
                                 batches=batches, criterion=criterion)
        try:
            timed = _timed({"cell": trainer.step}, plan.warmup, plan.study_steps, plan.block, device,
                           cap_seconds=plan.study_cell_seconds)["cell"]
            val = FeatureBatches([s.split("val") for s in stores], val_pixels, max(plan.batch, 8),
                                 ram_cache_gb=math.inf, device=device, device_cache_gb=held)
            eval_rate = run._eval_rate(trainer.model, val, 2, device)
        finally:
            trainer.close()
        out["cells"].append({"run": f"{cell.label} + {cell.decoder}", "encoder": cell.encoder, "fusion": cell.fusion,
                             "decoder": cell.decoder,
                             "loader": ("device" if held else "ram") if in_ram else "stream",
                             "steps_timed": timed["steps"], "train_samples_per_s": timed["samples_per_s"],
                             "eval_samples_per_s": eval_rate})
        ctx.save()
    out |= _study_estimate(runs, out["cells"], ctx.stores.reports | ctx.stores.warm_reports, encoder_per_sample,
                           ram_load_per_sample, startup, params, ctx.sections.get("pack", {}).get("best_by_decoder"))
    _print_study(out, device)
    return out


def limit_section(ctx: _Context) -> dict:
    """Per tap: achieved cache speedup vs its limit (encoder + decoder step) ÷ decoder step, timed and in FLOPs."""
    plan, device = ctx.plan, ctx.device
    policy = lambda: precision.autocast(device)  # noqa: E731  featinv's own precision on this device
    rows = []
    for tap in plan.limit_taps or ctx.params.study.taps:
        if ctx.left() < 0:
            break
        log.info("  limit %s", tap)
        store, encoder = ctx.stores.get(tap), ctx.stores.encoder(tap)
        cached = _cache_trainer(ctx, [store], run.DECODER, None, policy)
        naive = _naive_trainer(ctx, store, encoder, run.DECODER, policy)
        feats, pixels01 = _first_batch(FeatureBatches([store.split("train")], ImageStore(ctx.images).pixels("train"),
                                                      plan.batch, device=device))
        fixed = (decoder_inputs(feats, device), pixels01.to(device))
        decoder_only = _cache_trainer(ctx, [store], run.DECODER, None, policy, batches=[fixed],
                                      inputs_of=lambda f, p: f)

        def encoder_only(pixels01=fixed[1], encoder=encoder) -> int:
            with torch.no_grad(), policy():
                encoder(pixels01)
            return pixels01.shape[0]

        paths = {"cache": cached, "naive": naive, "decoder": decoder_only}
        if plan.limit_compile:  # both paths again with the decoder compiled; the warm-up compiles them
            # A fresh start per tap: past torch._dynamo's recompile limit (8 shapes of one forward)
            # it would silently run the later taps eager.
            torch.compiler.reset()
            paths |= {"cache_compiled": _cache_trainer(ctx, [store], run.DECODER, None, policy, compile_model=True),
                      "naive_compiled": _naive_trainer(ctx, store, encoder, run.DECODER, policy, compile_model=True)}
        try:
            timed = _timed({name: t.step for name, t in paths.items()} | {"encoder": encoder_only},
                           plan.warmup, plan.limit_steps, 1, device)
        finally:
            for t in paths.values():
                t.close()
        s = {k: np.asarray(v["seconds"]) for k, v in timed.items()}
        flops_encoder, flops_decoder = _flops(encoder, decoder_only, fixed, device)
        achieved = s["naive"].sum() / s["cache"].sum()
        limit_timed = (s["encoder"].sum() + s["decoder"].sum()) / s["decoder"].sum()
        limit_flops = (flops_encoder + flops_decoder) / flops_decoder
        rows.append({
            "tap": tap, "achieved": achieved, "limit_timed": limit_timed, "limit_flops": limit_flops,
            "achieved_over_limit_timed": achieved / limit_timed, "achieved_over_limit_flops": achieved / limit_flops,
            "median_round_achieved": float(np.median(s["naive"] / s["cache"])),
            "median_round_limit_timed": float(np.median((s["encoder"] + s["decoder"]) / s["decoder"])),
            "ms_cache_step": 1e3 * s["cache"].mean(), "ms_naive_step": 1e3 * s["naive"].mean(),
            "ms_encoder": 1e3 * s["encoder"].mean(), "ms_decoder_step": 1e3 * s["decoder"].mean(),
            "ms_cache_overhead": 1e3 * (s["cache"].mean() - s["decoder"].mean()),
            "gflop_encoder_per_sample": flops_encoder / 1e9, "gflop_decoder_step_per_sample": flops_decoder / 1e9,
            "encoder_gflops_per_s": flops_encoder * plan.batch / s["encoder"].mean() / 1e9,
            "decoder_gflops_per_s": flops_decoder * plan.batch / s["decoder"].mean() / 1e9,
        })
        if plan.limit_compile:
            achieved_compiled = s["naive_compiled"].sum() / s["cache_compiled"].sum()
            rows[-1] |= {"achieved_compiled": achieved_compiled,
                         "achieved_compiled_over_limit_flops": achieved_compiled / limit_flops,
                         "ms_cache_compiled_step": 1e3 * s["cache_compiled"].mean(),
                         "ms_naive_compiled_step": 1e3 * s["naive_compiled"].mean()}
        ctx.save()
    print(f"\n## Cache speedup vs its limit ({device.type}, {run.DECODER}, batch {plan.batch})\n")
    print(table(rows, ["tap", "achieved", "limit_timed", "limit_flops", "achieved_over_limit_timed",
                       "achieved_over_limit_flops", "ms_cache_step", "ms_decoder_step", "ms_encoder",
                       "ms_cache_overhead", "encoder_gflops_per_s", "decoder_gflops_per_s"]
                + (["achieved_compiled", "achieved_compiled_over_limit_flops", "ms_cache_compiled_step"]
                   if plan.limit_compile else []),
                {k: ".2f" for r in rows for k in r if k != "tap"}), flush=True)
    return {"rows": rows, "target": "achieved ÷ limit ≥ 0.8 on every tap",
            "definition": "achieved = naive step ÷ cache step (both from fetching the batch to Adam's step); "
                          "limit_timed = (encoder forward + decoder step on ready features) ÷ decoder step; "
                          "limit_flops = the same from FlopCounterMode counts (decoder forward + backward, one "
                          "sample); all four timed in one interleaved loop, one step each per round; "
                          "achieved_compiled: the same two paths with the decoder under torch.compile, "
                          "compiled during the untimed warm-up, in the same loop"}


def compile_section(ctx: _Context) -> dict:
    """torch.compile vs eager, cached step in featinv's precision: compile seconds, steady rates, break-even steps."""
    policy = lambda: precision.autocast(ctx.device)  # noqa: E731
    rows = []
    for tap, decoder in ctx.plan.compile_cases:
        if ctx.left() < 60:
            break
        store = ctx.stores.get(tap)
        torch.compiler.reset()  # compiled afresh for each case (and never past the recompile limit)
        eager = _cache_trainer(ctx, [store], decoder, None, policy)
        compiled = _cache_trainer(ctx, [store], decoder, None, policy, compile_model=True)
        try:
            t0 = time.perf_counter()
            for _ in range(3):  # compiles forward and backward
                compiled.step()
            run._sync(ctx.device)
            first = time.perf_counter() - t0
            timed = _timed({"eager": eager.step, "compiled": compiled.step}, ctx.plan.warmup, ctx.plan.steps,
                           ctx.plan.block, ctx.device)
        finally:
            eager.close()
            compiled.close()
        per_step = {k: 1 / v["samples_per_s"] * ctx.plan.batch for k, v in timed.items()}
        overhead = first - 3 * per_step["compiled"]
        gain = per_step["eager"] - per_step["compiled"]
        break_even = overhead / gain if gain > 0 else math.inf
        rows.append({"tap": tap, "decoder": decoder, "compile_seconds": overhead,
                     "eager_samples_per_s": timed["eager"]["samples_per_s"],
                     "compiled_samples_per_s": timed["compiled"]["samples_per_s"],
                     "break_even_steps": break_even, "cell_steps": CELL_STEPS, "pays": break_even < CELL_STEPS})
        ctx.save()
    print(f"\n## torch.compile ({ctx.device.type}, cached step, featinv's precision)\n")
    print(table(rows, ["tap", "decoder", "compile_seconds", "eager_samples_per_s", "compiled_samples_per_s",
                       "break_even_steps", "pays"], {"compile_seconds": ".1f", "eager_samples_per_s": ".1f",
                                                     "compiled_samples_per_s": ".1f", "break_even_steps": ".0f"}),
          flush=True)
    return {"rows": rows, "note": "compile_seconds = the first 3 compiled steps less 3 steady compiled steps; pays = "
                                  "it comes back within one study cell's steps (a cell is a fresh process)"}


SECTION_FUNCTIONS: dict[str, Callable[[_Context], dict]] = {
    "startup": startup_section, "extract": extract_section, "train": train_section, "loader": loader_section,
    "pack": pack_section, "study": study_section, "limit": limit_section, "compile": compile_section,
}


# ------------------------------------------------------------------------------------ helpers


class _MseNoSync(nn.Module):
    """Plain MSE, returning no per-part floats (ReconstructionLoss's float() waits for the device each step)."""

    def forward(self, pred01: torch.Tensor, target01: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return F.mse_loss(pred01, target01), {}


def protocol_loss(cfg: LossConfig, device: torch.device) -> tuple[ReconstructionLoss, dict]:
    """The study's own loss (``cfg``: the published 0.5·MSE + 0.5·LPIPS(AlexNet)), and what it ran with.

    LPIPS needs torchvision's trained AlexNet, which a machine without network lacks. Its cost
    does not depend on the weights, so there the loss is timed with a random-weight AlexNet
    (lpips' own ``pnet_rand``) and the result says so. Timing the study with MSE alone, as
    this benchmark did until run 4, left LPIPS out of every cell: 1.3–4.4× of the step on the H200.
    """
    note = loss_note(cfg)
    if cfg.lpips <= 0 or lpips_available():
        return ReconstructionLoss(cfg).to(device), note
    import lpips

    with contextlib.redirect_stdout(io.StringIO()):
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval().requires_grad_(False)
    return ReconstructionLoss(cfg, lpips_net=net).to(device), note


def loss_note(cfg: LossConfig) -> dict:
    """What :func:`protocol_loss` times with ``cfg`` on this machine, for the results."""
    alexnet = None
    if cfg.lpips > 0:
        alexnet = "trained (torchvision)" if lpips_available() else \
            "random weights (the trained ones are not on this machine; the same cost)"
    return {"loss": cfg.in_use(), "lpips_alexnet": alexnet}


def _amp(device: torch.device, prec: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The explicit precision setting ``prec`` on ``device``: float32, or bf16 autocast (CPU autocast on the CPU)."""
    if prec == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _cache_trainer(ctx: _Context, stores: list[FeatureStore], decoder: str, fusion: str | None, context: Callable,
                   batches=None, inputs_of: Callable | None = None, **kwargs) -> _Trainer:
    """A path trained from the cached features (RAM-cached unless ``batches`` says otherwise)."""
    if batches is None:
        batches = FeatureBatches([s.split("train") for s in stores], ImageStore(ctx.images).pixels("train"),
                                 ctx.plan.batch, shuffle=True, seed=run.SEED, ram_cache_gb=math.inf, drop_last=True,
                                 device=ctx.device,
                                 device_cache_gb=_device_cache_gb(ctx.params, ctx.device,
                                                                  [s.spec.name for s in stores]))
    inputs_of = inputs_of or (lambda feats, pixels01: decoder_inputs(feats, ctx.device))
    return _Trainer([s.spec for s in stores], decoder, fusion, batches, inputs_of, context, ctx.device, **kwargs)


def _device_cache_gb(params: Config, device: torch.device, taps: list[str]) -> float:
    """``device_cache_gb`` for a loader of ``taps``: what featinv's training would do with them at DIV2K scale."""
    held = device.type == "cuda" and _div2k_bytes(taps) <= params.train.device_cache_gb * 2**30
    return math.inf if held else 0.0


def _naive_trainer(ctx: _Context, store: FeatureStore, encoder: TapEncoder, decoder: str,
                   context: Callable, compile_model: bool = False) -> _Trainer:
    """A path that runs the frozen encoder on the pixels every step (the published way)."""
    batches = FeatureBatches([], ImageStore(ctx.images).pixels("train"), ctx.plan.batch, shuffle=True, seed=run.SEED,
                             drop_last=True, device=ctx.device)

    def inputs_of(feats, pixels01):
        with torch.no_grad(), context():
            return decoder_inputs([encoder(pixels01)], ctx.device)

    return _Trainer([store.spec], decoder, None, batches, inputs_of, context, ctx.device, compile_model=compile_model)


def _first_batch(batches: FeatureBatches) -> tuple[list[torch.Tensor], torch.Tensor]:
    stream = iter(batches)
    try:
        return next(stream)
    finally:
        stream.close()


def _timed(paths: dict[str, Callable[[], int]], warmup: int, steps: int, block: int, device: torch.device,
           cap_seconds: float = math.inf) -> dict[str, dict]:
    """Samples/s of each step function, stepping them in turn (load bursts hit every path alike).

    ``warmup`` untimed rounds first; then rounds of ``block`` consecutive steps per path,
    synchronised with the device at each end, until ``steps`` steps or ``cap_seconds`` of
    timed work.  Each function trains one batch and returns its samples.
    """
    for _ in range(warmup):
        for step in paths.values():
            step()
    run._sync(device)
    seconds: dict[str, list[float]] = {k: [] for k in paths}
    samples = dict.fromkeys(paths, 0)
    spent, done = 0.0, 0
    while done < steps and spent < cap_seconds:
        for name, step in paths.items():
            run._sync(device)
            t0 = time.perf_counter()
            samples[name] += sum(step() for _ in range(block))
            run._sync(device)
            seconds[name].append(time.perf_counter() - t0)
            spent += seconds[name][-1]
        done += block
    return {k: {"samples_per_s": samples[k] / sum(seconds[k]), "seconds": seconds[k], "steps": done} for k in paths}


def _forward_rate(encoder: TapEncoder, batch: int, context: Callable, device: torch.device, rounds: int) -> float:
    """Encoder forward images/s on synthetic pixels already on the device (one untimed batch first)."""
    pixels01 = precision.channels_last(torch.rand(batch, 3, 224, 224, device=device), device)
    with torch.inference_mode(), context():
        encoder(pixels01)
        run._sync(device)
        t0 = time.perf_counter()
        for _ in range(rounds):
            encoder(pixels01)
        run._sync(device)
    return batch * rounds / (time.perf_counter() - t0)


def _relative_error(encoder: TapEncoder, dtype: torch.dtype, device: torch.device) -> float | None:
    """‖stored − float32‖ / ‖float32‖ of the features of 4 synthetic images computed under ``dtype`` autocast.

    Stored = rounded to float16, as the feature store keeps them; None where the device has
    no autocast for ``dtype``.
    """
    generator = torch.Generator().manual_seed(0)
    pixels01 = precision.channels_last(torch.rand(4, 3, 224, 224, generator=generator).to(device), device)
    with torch.inference_mode():
        reference = encoder(pixels01).float()
        try:
            with torch.autocast(device.type, dtype=dtype):
                stored = encoder(pixels01).half().float()
        except RuntimeError:
            return None
    return float((stored - reference).norm() / reference.norm())


def _flops(encoder: TapEncoder, decoder_only: _Trainer, fixed: tuple, device: torch.device) -> tuple[float, float]:
    """Counted FLOPs per sample: the encoder's forward, and the decoder's forward + backward (one sample)."""
    feats, pixels01 = fixed
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(pixels01[:1])
    encoder_flops = counter.get_total_flops()
    model = decoder_only.model
    with FlopCounterMode(display=False) as counter:
        loss, _ = decoder_only.criterion(model([f[:1] for f in feats]), pixels01[:1])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(encoder_flops), float(counter.get_total_flops())


def _study_estimate(runs, cells: list[dict], extraction: dict[str, dict], encoder_per_sample: dict[str, float],
                    ram_load_per_sample: dict[str, float], startup: float | None, params: Config,
                    packing: dict[str, dict] | None = None) -> dict:
    """Each of the study's runs at DIV2K scale from its measured rates (unmeasured ones: the measured mean).

    ``packing`` (the ``pack`` section's best worker count and speedup per decoder) adds the study
    with that many cells sharing the device: each run's seconds ÷ its decoder's measured speedup.
    """
    if not cells:
        raise RuntimeError("no study cell was timed within the budget; raise --budget-seconds")
    measured = {(c["encoder"], c["fusion"], c["decoder"]): c for c in cells}
    mean_train = 1 / float(np.mean([1 / c["train_samples_per_s"] for c in cells]))
    mean_eval = 1 / float(np.mean([1 / c["eval_samples_per_s"] for c in cells]))
    per_run_train, per_run_eval = EPOCHS * DIV2K_TRAIN, EPOCHS * DIV2K_VAL + DIV2K_TEST

    def mean_of(values: dict[str, float]) -> float:
        return float(np.mean(list(values.values()))) if values else 0.0

    def tap_value(values: dict[str, float], tap: str) -> float:
        return values.get(tap, mean_of(values))

    rows, fixed = [], startup or 0.0
    for r in runs:
        cfg = dataclasses.replace(params, encoder=r.encoder, fusion=r.fusion, decoder=r.decoder)
        taps = run_taps(cfg)
        cell = measured.get((r.encoder, r.fusion, r.decoder))
        train_rate = cell["train_samples_per_s"] if cell else mean_train
        eval_rate = cell["eval_samples_per_s"] if cell else mean_eval
        in_ram = _div2k_bytes(taps) <= params.train.ram_cache_gb * 2**30
        ram_load = sum(tap_value(ram_load_per_sample, t) for t in taps) * (DIV2K_TRAIN + DIV2K_VAL) if in_ram else 0.0
        seconds = fixed + ram_load + per_run_train / train_rate + per_run_eval / eval_rate
        encoder_seconds = (per_run_train + per_run_eval) * sum(tap_value(encoder_per_sample, t) for t in taps)
        rows.append({"run": f"{r.label} + {r.decoder}", "measured": cell is not None, "seconds": seconds,
                     "naive_seconds": seconds - ram_load + encoder_seconds})
    extract_seconds = {}
    for tap in params.study.taps:
        report = extraction.get(tap)
        if report is None:
            per_sample = mean_of({t: (e["extract_seconds"] - e["encoder_build_seconds"]) / e["extract_samples"]
                                  for t, e in extraction.items()})
            build = mean_of({t: e["encoder_build_seconds"] for t, e in extraction.items()})
        else:
            per_sample = (report["extract_seconds"] - report["encoder_build_seconds"]) / report["extract_samples"]
            build = report["encoder_build_seconds"]
        extract_seconds[tap] = build + per_sample * DIV2K_IMAGES
    runs_seconds = sum(r["seconds"] for r in rows)
    total = runs_seconds + sum(extract_seconds.values())
    naive = sum(r["naive_seconds"] for r in rows)
    packed = _packed_estimate(rows, runs, extract_seconds, packing, params) if packing else None
    return {
        "runs": len(rows),
        "measured_runs": sum(r["measured"] for r in rows),
        "per_run": rows,
        "extract_seconds_per_tap": extract_seconds,
        "cell_fixed_seconds": startup,
        "featinv_hours": total / 3600,
        "featinv_runs_hours": runs_seconds / 3600,
        "featinv_extract_hours": sum(extract_seconds.values()) / 3600,
        "published_gpu_hours": PUBLISHED_GPU_HOURS,
        "published_over_featinv": PUBLISHED_GPU_HOURS / (total / 3600),
        "naive_hours_estimate": naive / 3600,
        "packed": packed,
        "extrapolated": True,
        "from": (f"per run {per_run_train} training samples ({EPOCHS} epochs × {DIV2K_TRAIN}) at the cell's measured "
                 f"samples/s, {per_run_eval} evaluation samples (val every epoch + test) at its measured decoder "
                 "inference rate, the measured start-up of a fresh cell process (null: not measured, counted as 0), "
                 "and for RAM-cached splits the measured load time per sample × (train + val); extraction = "
                 f"one encoder build + measured seconds per sample × {DIV2K_IMAGES}; unmeasured runs/taps take "
                 "the measured mean. naive_hours_estimate adds the encoder's measured batch-size forward per "
                 "sample to every training and evaluation sample instead of the cache (an additive model, not a "
                 f"run); the published {PUBLISHED_GPU_HOURS:.0f} h are an RTX 6000 Ada's"),
    }


def _packed_estimate(rows: list[dict], runs, extract_seconds: dict[str, float], packing: dict[str, dict],
                     params: Config) -> dict:
    """The study with cells sharing the device: each run's seconds ÷ its decoder's measured ``pack`` speedup."""
    packed_seconds = sum(r["seconds"] / packing.get(run_.decoder, {}).get("speedup", 1.0)
                         for r, run_ in zip(rows, runs))
    total = packed_seconds + sum(extract_seconds.values())
    workers = max(p["workers"] for p in packing.values())
    ram = max((_div2k_bytes(run_taps(dataclasses.replace(params, encoder=r.encoder, fusion=r.fusion)))
               for r in runs), default=0)
    return {"workers_by_decoder": {d: p["workers"] for d, p in packing.items()},
            "precision_by_decoder": {d: p.get("precision", "policy") for d, p in packing.items()},
            "speedup_by_decoder": {d: p["speedup"] for d, p in packing.items()},
            "unpacked_decoders": sorted({r.decoder for r in runs} - set(packing)),
            "runs_hours": packed_seconds / 3600,
            "hours": total / 3600,
            "published_over_featinv": PUBLISHED_GPU_HOURS * 3600 / total,
            "ram_gib_at_most": workers * min(ram, params.train.ram_cache_gb * 2**30) / 2**30,
            "from": "each run's seconds above ÷ the measured speedup of its decoder's cells sharing the device "
                    "(`pack`, its best valid worker count); decoders with no valid measurement (unpacked_decoders) "
                    "count no speedup; extraction unchanged (one tap at a time); ram_gib_at_most: that many "
                    "workers each holding the largest RAM-cached training split"}


def rescore(path: Path) -> dict:
    """Re-derive a saved run's ``pack`` speedups and packed study estimate with this file's rules (written back).

    For a result measured before a rule changed: the measured rows are kept as they are; what is
    computed from them is computed again and the file says so (``rescored``).
    """
    result = json.loads(path.read_text())
    sections = result["sections"]
    pack, study = sections["pack"], sections["study"]
    packing = pack_speedups(pack["rows"], result["plan"]["pack_seconds"])
    pack["best_by_decoder"] = packing
    params = _published_study_params()
    runs = plan_runs(params)
    if [f"{r.label} + {r.decoder}" for r in runs] != [r["run"] for r in study["per_run"]]:
        raise ValueError(f"{path}: its study's runs are not this params.yaml's published study")
    study["packed"] = _packed_estimate(study["per_run"], runs, study["extract_seconds_per_tap"], packing, params)
    result["rescored"] = {"date": time.strftime("%Y-%m-%d"), "what": "pack validity and speedups; study.packed",
                          "rule": f"late_seconds ≤ {PACK_LATE_FRACTION:.0%} of pack_seconds"}
    write_json(path, run._rounded(result))
    return result


def _published_study_params() -> Config:
    """params.yaml with the published protocol and 44-run grid, whatever the defaults are.

    The protocol (``paper``) brings the published loss, 0.5·MSE + 0.5·LPIPS(AlexNet), which
    every cell's step pays; its data and weights settings are not used here (synthetic pixels,
    random encoder weights: the same cost).
    """
    return with_overrides(load_params(run.REPO / "params.yaml"),
                          preset_overrides("paper") + preset_overrides("published_study"))


def _div2k_bytes(taps: list[str]) -> int:
    """float16 bytes of the taps' training split at DIV2K scale (what ``ram_cache_gb`` is compared with)."""
    return sum(int(np.prod(resolve_tap(t).shape)) * 2 * DIV2K_TRAIN for t in taps)


def _synthetic_data(plan: Plan, work: Path) -> DataConfig:
    """A folder source of synthetic photographs (written once per work dir, not timed)."""
    root = work / "synthetic" / f"{plan.train_images}-{plan.test_images}"
    for split, count, first_seed in (("train", plan.train_images, 0), ("test", plan.test_images, 100_000)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"{i:04d}.png"
            if not path.is_file():
                Image.fromarray(_synthetic_photo(first_seed + i)).save(path)
    return DataConfig(source="folder", train_dir=str(root / "train"), test_dir=str(root / "test"),
                      val_fraction=0.2, train_views=plan.train_views)


def _synthetic_photo(seed: int) -> np.ndarray:
    """Smooth random colour fields plus grain: compresses and activates encoders more like a photo than noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((SYNTHETIC_SIDE,) * 2, Image.Resampling.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def _environment(device: torch.device) -> dict:
    """Where the figures were measured: the machine, library versions, the card."""
    env = machine() | {
        "device": str(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "torchvision", "timm", "zarr", "numpy")},
        "loadavg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu_memory_gib": props.total_memory / 2**30, "capability": f"{props.major}.{props.minor}",
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    return env


def _child(command: list[str]) -> str:
    """Run a fresh Python process in the repository; its stdout (a failure raises with its stderr).

    Its web proxy is a closed port on this machine: on a machine without network, LPIPS' weight
    download (evaluation tries it when the weights are not cached) fails at once instead of
    waiting for a connection timeout; with the weights cached nothing is downloaded anyway.
    """
    refuse = "http://127.0.0.1:9"
    env = os.environ | {"http_proxy": refuse, "https_proxy": refuse, "HTTP_PROXY": refuse, "HTTPS_PROXY": refuse,
                        "no_proxy": "", "NO_PROXY": ""}
    done = subprocess.run(command, capture_output=True, cwd=run.REPO, timeout=CHILD_TIMEOUT, check=False, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _child_seconds(command: list[str]) -> float:
    t0 = time.perf_counter()
    _child(command)
    return time.perf_counter() - t0


def _profile_breakdown(path: Path) -> dict[str, float]:
    """Cumulative seconds of the :data:`PROFILED` functions in a cProfile dump (0 where absent)."""
    import pstats

    stats = pstats.Stats(str(path)).stats
    out = dict.fromkeys(PROFILED.values(), 0.0)
    for (file, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        label = next((v for (suffix, fn), v in PROFILED.items() if fn == name and file.endswith(suffix)), None)
        if label is not None:
            out[label] += cumulative
    return out


def _plain(obj):
    """``obj`` with tuples as lists (YAML-safe)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _print_study(study: dict, device: torch.device) -> None:
    print(f"\n## Study at DIV2K scale ({device.type}; {study['measured_runs']} of {study['runs']} runs measured)\n")
    rows = [{"path": "featinv: extraction (8 taps × 2,820 images)", "hours": study["featinv_extract_hours"]},
            {"path": "featinv: 44 runs from the cache", "hours": study["featinv_runs_hours"]},
            {"path": "featinv: total", "hours": study["featinv_hours"]},
            *([{"path": f"featinv: total, cells sharing the device ({study['packed']['workers_by_decoder']})",
                "hours": study["packed"]["hours"]}] if study.get("packed") else []),
            {"path": "encoder in the loop (additive estimate, this device)", "hours": study["naive_hours_estimate"]},
            {"path": "published (RTX 6000 Ada, encoder in the loop)", "hours": study["published_gpu_hours"]}]
    print(table(rows, ["path", "hours"], {"hours": ".3f"}))
    print(f"\npublished ÷ featinv = {study['published_over_featinv']:.1f}", flush=True)


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if outcome["errors"] else 0)
