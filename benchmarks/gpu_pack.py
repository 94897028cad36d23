"""One worker of ``benchmarks.gpu``'s ``pack`` section: a study cell's training loop sharing the GPU.

A study cell trains at the published batch of 4, too small to keep a GPU busy; ``featinv study
--executor dask --workers K`` runs K cells at once on each GPU. This process is one of K
such cells: it trains from the benchmark's cached features during the time windows of a
common schedule and reports how many samples it trained in each, so the parent can add up
what K cells sharing the card achieve together.

    python -m benchmarks.gpu_pack --config work/pack/config.json --slot 0   # started by benchmarks.gpu

Protocol (files in the config's folder): the worker trains a few steps of each of its cells
(CUDA's start, cuDNN's autotuning), writes ``ready-<slot>`` and waits for ``go``, which holds
the common start time (``time.time()`` seconds). Then, for each window whose worker count
exceeds its slot, it builds the cell afresh (warm-up phase: model, Adam, RAM-cached loader)
and trains; the samples trained between the window's measure start and its end go to
``result-<slot>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks import run
from benchmarks.gpu import _Trainer, _amp, protocol_loss
from featinv import precision
from featinv.config import LossConfig
from featinv.data.image_store import ImageStore
from featinv.store.feature_store import FeatureStore, store_path
from featinv.store.loader import FeatureBatches
from featinv.training.train import decoder_inputs

GO_TIMEOUT = 300.0  # seconds a worker waits for the parent's go


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--slot", type=int, required=True)
    args = p.parse_args(argv)
    config = json.loads(args.config.read_text())
    folder = args.config.parent
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    precision.setup(device)
    pixels = ImageStore(Path(config["images"])).pixels("train")
    # The study's loss, built once: every cell of this worker shares the frozen LPIPS network.
    criterion, _ = protocol_loss(LossConfig(**config["loss"]), device)
    mine = [(index, w) for index, w in enumerate(config["windows"]) if args.slot < w["workers"]]
    # Every cell this worker will train, a few steps each before the common start: CUDA's
    # initialisation and cuDNN's autotuning of each cell's shapes would otherwise fall into a window.
    for window in {(tuple(w["taps"]), w["decoder"], w["fusion"], w["precision"]): w for _, w in mine}.values():
        trainer = _cell(config, window, pixels, args.slot, device, criterion)
        try:
            for _ in range(config["warm_steps"]):
                trainer.step()
        finally:
            trainer.close()
    run._sync(device)
    (folder / f"ready-{args.slot}").write_text("")
    start = _wait_for_go(folder / "go")
    results = []
    for index, window in mine:
        _sleep_until(start + window["warm_at"])
        trainer = _cell(config, window, pixels, args.slot, device, criterion)
        try:
            while time.time() < start + window["measure_at"]:
                trainer.step()
            run._sync(device)
            t0, samples = time.time(), 0
            while time.time() < start + window["end_at"]:
                samples += trainer.step()
            run._sync(device)
            t1 = time.time()
        finally:
            trainer.close()
        results.append({"window": index, "samples": samples, "seconds": t1 - t0,
                        "late_seconds": max(0.0, t0 - (start + window["measure_at"]))})
    (folder / f"result-{args.slot}.json").write_text(json.dumps(results))


def _cell(config: dict, window: dict, pixels, slot: int, device: torch.device, criterion) -> _Trainer:
    """A fresh study cell of ``window``: seeded model, Adam, RAM-cached loader, featinv's precision policy and the study's loss."""
    stores = [FeatureStore(store_path(Path(config["features"]), t)) for t in window["taps"]]
    batches = FeatureBatches([s.split("train") for s in stores], pixels, config["batch"], shuffle=True,
                             seed=run.SEED + slot, ram_cache_gb=math.inf, drop_last=True, device=device,
                             device_cache_gb=math.inf if window.get("held_on_device") else 0.0)
    context = (lambda: precision.autocast(device)) if window["precision"] == "policy" else _amp(device, "fp32")
    return _Trainer([s.spec for s in stores], window["decoder"], window["fusion"], batches,
                    lambda feats, pixels01: decoder_inputs(feats, device), context, device,
                    criterion=criterion)


def _wait_for_go(path: Path) -> float:
    deadline = time.time() + GO_TIMEOUT
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"no {path} within {GO_TIMEOUT:.0f} s")
        time.sleep(0.05)
    return float(path.read_text())


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))


if __name__ == "__main__":
    main()
