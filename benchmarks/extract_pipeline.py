"""Extraction images/s: ``extract_features`` as shipped vs the serial pipeline it replaced.

Why it exists: on the H200 (2026-11-28) the encoder computed vgg16/block1 at 20,000 images/s
in bf16, yet ``extract_features`` stored 284 images/s with zstd and 321 with no codec at all,
so neither the GPU nor the codec was the limit. The old loop waited for every batch: the
features came back with a plain ``.cpu()`` (pageable memory: the host waits for the GPU,
then copies at pageable speed) and the next batch's pixels were read only after that.
Now each batch's features go to page-locked memory without the host waiting, the overflow
check travels with them to the writer thread, and the next pixels are read (page-locked on
CUDA) while the current batch computes.

"serial" rebuilds the old loop by replacing those two pieces of ``featinv.store.feature_store``
for the duration of its runs; "shipped" is the library as it is. Both extract the same tap
from the same prepared images into fresh stores, interleaved, best of ``--repeats``, per codec.
Timings exclude nothing: store creation, encoder build and the final commit are in them,
as in a user's ``featinv extract`` (the encoder build is also reported alone).

    python -m benchmarks.extract_pipeline                       # synthetic images, vgg16/block1
    python -m benchmarks.extract_pipeline --images 200 --codecs zstd none --batch 256

Prints a table and writes benchmarks/results/extract_pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import featinv.store.feature_store as feature_store
from benchmarks import run
from benchmarks.common import RESULTS, machine, table, write_json
from benchmarks.gpu import GPU, _synthetic_data
from featinv.config import ExtractConfig
from featinv.errors import FeatinvError
from featinv.zarr_utils import remove_tree


@contextlib.contextmanager
def _serial():
    """The loop before the pipelining: a blocking ``.cpu()`` with the overflow check, pixels read in line."""

    def copy_back(stored: torch.Tensor, finite: torch.Tensor, tap: str):
        if not bool(finite):
            raise FeatinvError(f"tap {tap}: activations overflow float16 storage")
        return feature_store._HostFeatures(stored.cpu(), finite.cpu(), None, tap)

    def read_in_line(pixels, ranges, device):
        for begin, end in ranges:
            yield torch.from_numpy(np.asarray(pixels[begin:end]))

    saved = feature_store._HostFeatures.__dict__["of"], feature_store._read_ahead
    feature_store._HostFeatures.of, feature_store._read_ahead = staticmethod(copy_back), read_in_line
    try:
        yield
    finally:
        feature_store._HostFeatures.of, feature_store._read_ahead = saved


PIPELINES = {"serial": _serial, "shipped": contextlib.nullcontext}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tap", default="vgg16/block1")
    p.add_argument("--images", type=int, default=80, help="synthetic training photographs (x4 views, +val/test)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--codecs", nargs="+", default=["zstd", "none"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--work", type=Path, default=run.WORK / "extract_pipeline")
    p.add_argument("--out", type=Path, default=RESULTS / "extract_pipeline.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    plan = dataclasses.replace(GPU, train_images=args.images, test_images=max(1, args.images // 10))
    images = run._prepared(_synthetic_data(plan, args.work), args.work)
    count = sum(run._counts(images).values())
    rows = {(codec, name): {"codec": codec, "pipeline": name, "seconds": []} for codec in args.codecs
            for name in PIPELINES}
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        for codec in args.codecs:  # one unmeasured extraction first: CUDA, cuDNN and the allocators warm up
            cfg = ExtractConfig(weights="random", device=str(device), batch_size=args.batch, codec=codec)
            feature_store.extract_features(images, args.tap, Path(scratch) / "warm.zarr", cfg)
            remove_tree(Path(scratch) / "warm.zarr")
        for _ in range(args.repeats):
            for codec in args.codecs:
                cfg = ExtractConfig(weights="random", device=str(device), batch_size=args.batch, codec=codec)
                for name, pipeline in PIPELINES.items():
                    out = Path(scratch) / f"{codec}-{name}.zarr"
                    with pipeline():
                        t0 = time.perf_counter()
                        feature_store.extract_features(images, args.tap, out, cfg)
                        rows[codec, name]["seconds"].append(time.perf_counter() - t0)
                    remove_tree(out)
    for row in rows.values():
        row["images_per_s"] = count / min(row["seconds"])
        row["over_serial"] = row["images_per_s"] / rows[row["codec"], "serial"]["images_per_s"]
    result = list(rows.values())
    print(f"\n## extract_features, {args.tap}, {count} images, batch {args.batch}, {device} "
          f"(best of {args.repeats})\n")
    print(table(result, ["codec", "pipeline", "images_per_s", "over_serial"],
                {"images_per_s": ".1f", "over_serial": ".2f"}), flush=True)
    given = sys.argv[1:] if argv is None else argv
    write_json(args.out, {"command": " ".join(["python -m benchmarks.extract_pipeline", *given]),
                          "machine": machine(), "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                          "tap": args.tap, "images": count, "batch": args.batch, "rows": result})
    return result


if __name__ == "__main__":
    main()
