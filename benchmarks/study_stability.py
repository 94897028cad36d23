"""Is the study's ranking a property of the taps, or of the seed? Run the default study twice.

The study grid of ``params.yaml`` (or ``--params``) is trained and evaluated with its per-run
budget under two training seeds, from one shared feature cache, exactly as the study's cells
do it (the library functions ``pipeline.study_run`` calls, without DVC's per-cell process
start-up).  Reported: each ranking, whether the top 3 agree, Kendall's tau between the two, and
the wall time of one study — the figures behind the default budget the README promises.

    python -m benchmarks.study_stability                  # writes benchmarks/results/study_stability.json
    python -m benchmarks.study_stability --seeds 42 43 --set study.samples_per_epoch=64
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

from benchmarks.common import RESULTS, WORK, machine, write_json
from featinv.config import load_params, with_overrides
from featinv.evaluation.evaluate import evaluate_run
from featinv.store.feature_store import extract_features, store_path
from featinv.data.image_store import prepare_images
from featinv.study.grid import plan_runs
from featinv.training.train import run_taps, train_decoder

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs=2, default=[42, 43], help="the two training seeds")
    p.add_argument("--work", type=Path, default=WORK / "study_stability")
    p.add_argument("--out", type=Path, default=RESULTS / "study_stability.json")
    args = p.parse_args(argv)
    base = with_overrides(load_params(args.params), args.overrides)
    base = dataclasses.replace(base, train=dataclasses.replace(
        base.train, device="cpu", epochs=base.study.epochs, samples_per_epoch=base.study.samples_per_epoch,
        max_minutes=base.study.max_minutes), extract=dataclasses.replace(base.extract, device="cpu"),
        evaluate=dataclasses.replace(base.evaluate, device="cpu"))
    runs = plan_runs(base)
    images = args.work / "images.zarr"
    features = args.work / "features"
    t0 = time.perf_counter()
    prepare_images(base.data, base.seed, images)
    taps = sorted({t for r in runs for t in run_taps(dataclasses.replace(base, encoder=r.encoder))})
    for tap in taps:
        extract_features(images, tap, store_path(features, tap), base.extract)
    extract_seconds = time.perf_counter() - t0
    rankings, seconds = {}, {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        scores = []
        for run in runs:
            cfg = dataclasses.replace(base, encoder=run.encoder, fusion=run.fusion, decoder=run.decoder,
                                      train=dataclasses.replace(base.train, seed=seed))
            out = args.work / f"seed{seed}" / run.label / run.decoder
            result = train_decoder(cfg, images, features, out)
            m = evaluate_run(result.best_checkpoint, images, features, cfg.evaluate, out / "eval.json",
                             out / "eval.csv", out / "grid.png", run_config=cfg)
            scores.append({"cell": f"{run.label} + {run.decoder}", "psnr": m["psnr"]["mean"],
                           "psnr_over_thumbnail": m.get("psnr_over_thumbnail"),
                           "still_improving": result.best_epoch == result.epochs_run})
            print(f"seed {seed}: {scores[-1]['cell']}: {scores[-1]['psnr']:.2f} dB", flush=True)
        rankings[seed] = sorted(scores, key=lambda s: -s["psnr"])
        seconds[seed] = time.perf_counter() - t0
    first, second = (rankings[s] for s in args.seeds)
    top3 = [[s["cell"] for s in r[:3]] for r in (first, second)]
    summary = {
        "machine": machine(),
        "command": "python -m benchmarks.study_stability " + " ".join(
            [f"--seeds {args.seeds[0]} {args.seeds[1]}", *(f"--set {o}" for o in args.overrides)]),
        "cells": len(runs),
        "budget": {"epochs": base.study.epochs, "samples_per_epoch": base.study.samples_per_epoch,
                   "max_minutes": base.study.max_minutes},
        "extract_seconds": extract_seconds,
        "study_seconds": {str(k): v for k, v in seconds.items()},
        "top3": top3,
        "top3_same_cells": set(top3[0]) == set(top3[1]),
        "top3_same_order": top3[0] == top3[1],
        "kendall_tau": _kendall_tau([s["cell"] for s in first], [s["cell"] for s in second]),
        "rankings": {str(k): v for k, v in rankings.items()},
    }
    write_json(args.out, summary)
    print(f"top 3 {'agree' if summary['top3_same_cells'] else 'differ'} "
          f"({'same order' if summary['top3_same_order'] else 'order differs'}); Kendall tau "
          f"{summary['kendall_tau']:.2f}; one study: {seconds[args.seeds[0]] / 60:.1f} min + "
          f"{extract_seconds / 60:.1f} min extraction; wrote {args.out}")
    return summary


def _kendall_tau(order_a: list[str], order_b: list[str]) -> float:
    """Kendall's tau between two rankings of the same cells (1: identical, -1: reversed)."""
    rank_b = {cell: i for i, cell in enumerate(order_b)}
    pairs = list(itertools.combinations(order_a, 2))
    concordant = sum(rank_b[a] < rank_b[b] for a, b in pairs)
    return (2 * concordant - len(pairs)) / max(len(pairs), 1)


if __name__ == "__main__":
    main()
