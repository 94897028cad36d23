"""Decoder training step time by memory format: NCHW vs channels_last, on this machine.

Why it exists: the performance suite's encoder-in-the-loop path hands the decoder
the encoder's output, which is channels_last (timm/torchvision convolutions keep
it), while featinv's loader hands it NCHW tensors decoded from the store.  On a
CPU several decoders train at quite different speeds in the two formats, so this
measures, per decoder, the training loop's step (:func:`featinv.training.step.training_step`:
forward, MSE, backward, Adam) on random features
in three settings: NCHW input; channels_last input; channels_last input and
weights.  Step times are means over ``--steps`` steps after two untimed ones;
the settings are interleaved step by step so load on a shared machine hits all
of them alike.

    python -m benchmarks.memory_format            # vgg16/block1-shaped input, batch 4
    python -m benchmarks.memory_format --shape 64 56 56

Prints a table and writes benchmarks/results/memory_format.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine, table, write_json
from featinv.config import LossConfig
from featinv.decoders import DECODERS, build_decoder
from featinv.training.losses import ReconstructionLoss
from featinv.training.model import Reconstructor
from featinv.training.step import build_optimizer, training_step

SETTINGS = ("nchw", "channels_last_input", "channels_last_all")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 112, 112), metavar=("C", "H", "W"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--decoders", nargs="+", default=DECODERS.names())
    p.add_argument("--out", type=Path, default=RESULTS / "memory_format.json")
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    rows = []
    for name in args.decoders:
        seconds = _step_seconds(name, shape, args.batch, args.steps)
        best = min(seconds, key=seconds.get)
        rows.append({"decoder": name, **{f"{k}_s": round(v, 4) for k, v in seconds.items()},
                     "channels_last_speedup": round(seconds["nchw"] / seconds[best], 2), "fastest": best})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    info = machine()
    write_json(args.out, {"machine": info, "command": "python -m benchmarks.memory_format " + " ".join(argv or []),
                          "shape": shape, "batch": args.batch, "steps": args.steps, "rows": rows})
    print(table(rows, list(rows[0])))
    return rows


def _step_seconds(name: str, shape: tuple[int, int, int], batch: int, steps: int) -> dict[str, float]:
    runs = {}
    device = torch.device("cpu")
    criterion = ReconstructionLoss(LossConfig(mse=1.0))
    for setting in SETTINGS:
        torch.manual_seed(0)
        model = Reconstructor(build_decoder(name, shape))
        if setting == "channels_last_all":
            model = model.to(memory_format=torch.channels_last)
        feats = torch.randn(batch, *shape).relu()
        if setting != "nchw":
            feats = feats.contiguous(memory_format=torch.channels_last)
        runs[setting] = (model, build_optimizer(model, 1e-3, device), feats)
    target = torch.rand(batch, 3, 224, 224)
    totals = dict.fromkeys(SETTINGS, 0.0)
    for step in range(2 + steps):
        for setting, (model, optimizer, feats) in runs.items():
            start = time.perf_counter()
            training_step(model, optimizer, criterion, [feats], target)  # the training loop's step
            if step >= 2:
                totals[setting] += time.perf_counter() - start
    return {k: v / steps for k, v in totals.items()}


if __name__ == "__main__":
    main()
