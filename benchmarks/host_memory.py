"""Training steps/s on the CPU with glibc's default allocator vs :func:`featinv.host_memory.keep_freed_memory`.

Why it exists: a CPU training step frees and re-allocates the same few-MB activations every
step, and glibc's malloc returns such blocks to the OS and page-faults them back in (module
docstring of :mod:`featinv.host_memory`).  The setting is per process and cannot be undone,
so each measurement is a fresh child process: the training loop's own step of a recipe — the
loader's batch (:class:`featinv.store.loader.FeatureBatches`, from RAM), then
:func:`featinv.training.step.training_step` (``forward_valid`` or forward, MSE in float32,
backward, Adam from :func:`~featinv.training.step.build_optimizer`) — the recipe's number of
steps (``RECIPES``) after ``--warmup`` untimed ones.  Children with and without the setting alternate ``--rounds``
times, so load on a shared machine hits both alike; the table gives the median of each.
Minor page faults per step (``getrusage``) do not depend on load at all; the peak RSS
(VmHWM) says what keeping the freed blocks costs.

The maps are random float16 of the tap's shape, ``--maps`` of them (432 = the quality
benchmark's 54 CBSD68 photographs × 8 views); timing does not depend on the values.

    python -m benchmarks.host_memory                 # vgg16/block1: local_mlp, residual_shuffle, transposed_conv

Prints a table and writes benchmarks/results/host_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, machine, table, write_json
from benchmarks.peak_rss import peak_rss_mb
from featinv import host_memory, precision
from featinv.config import Config, LossConfig, with_overrides
from featinv.encoders.taps import resolve_tap
from featinv.presets import preset_overrides
from featinv.store.loader import FeatureBatches, FeatureCrop
from featinv.training.losses import ReconstructionLoss
from featinv.training.model import build_reconstructor
from featinv.training.step import build_optimizer, training_step
from featinv.training.train import decoder_inputs

_LOCAL_MLP = with_overrides(Config(), preset_overrides("local_mlp")).train
# decoder → (batch, feature crop or None for whole maps, train.precision, timed steps): the quality
# benchmark's recipes (the published transposed_conv trains on whole maps at batch 4)
RECIPES = {"local_mlp": (_LOCAL_MLP.batch_size, _LOCAL_MLP.feature_crop, _LOCAL_MLP.precision, 150),
           "residual_shuffle": (16, 32, "float32", 12),
           "transposed_conv": (4, None, "float32", 12)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tap", default="vgg16/block1")
    p.add_argument("--maps", type=int, default=432)
    p.add_argument("--decoders", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--rounds", type=int, default=3, help="children per setting and decoder")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, help="timed steps per child (default: the recipe's, RECIPES)")
    p.add_argument("--out", type=Path, default=RESULTS / "host_memory.json")
    p.add_argument("--child", nargs=2, metavar=("DECODER", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.tap, args.maps, args.child[0], args.child[1] == "1", args.warmup, args.steps)))
        return []
    rows = []
    for name in args.decoders:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.rounds):
            for keep in (False, True):
                out = subprocess.run([sys.executable, "-m", "benchmarks.host_memory", "--tap", args.tap, "--maps",
                                      str(args.maps), "--warmup", str(args.warmup), "--child", name, str(int(keep)),
                                      *(["--steps", str(args.steps)] if args.steps else [])],
                                     check=True, capture_output=True, text=True).stdout
                runs[keep].append(json.loads(out.strip().splitlines()[-1]))
        med = {keep: {k: statistics.median(r[k] for r in rs) for k in ("ms_per_step", "faults_per_step", "max_rss_mb")}
               for keep, rs in runs.items()}
        batch, crop, wanted, steps = RECIPES[name]
        rows.append({"tap": args.tap, "decoder": name, "batch": batch, "feature_crop": crop,
                     "precision": runs[True][0]["precision"], "steps": args.steps or steps,
                     "applied": runs[True][0]["applied"],
                     "default_ms_per_step": med[False]["ms_per_step"], "kept_ms_per_step": med[True]["ms_per_step"],
                     "speedup": med[False]["ms_per_step"] / med[True]["ms_per_step"],
                     "default_faults_per_step": med[False]["faults_per_step"],
                     "kept_faults_per_step": med[True]["faults_per_step"],
                     "default_max_rss_mb": med[False]["max_rss_mb"], "kept_max_rss_mb": med[True]["max_rss_mb"],
                     "runs": {"default": runs[False], "kept": runs[True]}})
        print(table(rows[-1:], [k for k in rows[-1] if k != "runs"],
                    {k: ".2f" for k in rows[-1] if k.endswith(("_step", "speedup"))} |
                    {k: ".0f" for k in rows[-1] if k.endswith(("faults_per_step", "_mb"))}), flush=True)
    write_json(args.out, {"machine": machine(), "maps": args.maps, "rounds": args.rounds, "rows": rows})
    return rows


def _measure(tap: str, maps: int, name: str, keep: bool, warmup: int, timed_steps: int | None = None) -> dict:
    """One child: the recipe's training step, timed (see the module docstring)."""
    applied = host_memory.keep_freed_memory() if keep else False
    spec = resolve_tap(tap)
    rng = np.random.default_rng(0)
    feats = np.empty((maps, *spec.shape), dtype=np.float16)  # filled map by map: no float32 copy of them all
    for i in range(maps):
        feats[i] = rng.standard_normal(spec.shape, dtype=np.float32)
    pixels = rng.integers(0, 256, (maps, 224, 224, 3), dtype=np.uint8)
    device = torch.device("cpu")
    batch, crop_size, wanted, steps = RECIPES[name]
    steps = timed_steps or steps
    amp_dtype, _ = precision.training_dtype(device, wanted)
    torch.manual_seed(0)
    model = build_reconstructor([spec], name, None, 224)
    crop = None if crop_size is None else FeatureCrop(crop_size, 224 // spec.height,
                                                      int(getattr(model.decoder, "context_margin", 0)))
    optimizer = build_optimizer(model, 1e-4, device)
    criterion = ReconstructionLoss(LossConfig(mse=1.0))
    batches = FeatureBatches([feats], pixels, batch, shuffle=True, seed=0, drop_last=True, crop=crop,
                             samples_per_epoch=batch * (steps + warmup))
    del feats

    def step(fmaps, target) -> None:
        training_step(model, optimizer, criterion, decoder_inputs(fmaps, device), target, amp_dtype=amp_dtype,
                      windows=crop is not None and bool(crop.margin))

    stream = iter(batches)
    for _ in range(warmup):
        step(*next(stream))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for fmaps, target in stream:
        step(fmaps, target)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"applied": applied, "precision": "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
            "ms_per_step": seconds / steps * 1000, "faults_per_step": (usage.ru_minflt - faults) / steps,
            "max_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    main()
