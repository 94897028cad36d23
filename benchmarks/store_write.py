"""Feature-store write rate: Zarr chunks/s per codec, with and without the empty-chunk check.

Why it exists: on the H200, ``extract_features`` stored vgg16/block1 at 105 images/s while the
encoder computed 20,215/s, so the store's writes are extraction's limit. By default Zarr
compares every chunk with the fill value before writing it (``write_empty_chunks=False``),
which for float16 is a slow element-wise comparison; features are never one whole all-zero
map, so featinv skips it. This times exactly that write: ``array[:] = x`` of ``--samples``
one-sample chunks of post-ReLU Gaussian float16 features (vgg16/block1-shaped by default),
best of ``--repeats``, per codec as ``extract.codec`` names them, both settings interleaved.

    python -m benchmarks.store_write                      # (64, 112, 112) float16, 64 samples
    python -m benchmarks.store_write --shape 256 56 56

Prints a table and writes benchmarks/results/store_write.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from benchmarks.common import RESULTS, machine, table, write_json
from featinv.zarr_utils import CODECS, compressors_for


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 112, 112), metavar=("C", "H", "W"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codecs", nargs="+", default=list(CODECS))
    p.add_argument("--out", type=Path, default=RESULTS / "store_write.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((args.samples, *args.shape), dtype=np.float32), 0).astype(np.float16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs:
            arrays = {}
            for check in (True, False):  # check = Zarr's default: compare each chunk with the fill value
                array = zarr.create_array(store=str(Path(tmp) / f"{codec}-{check}"), shape=feats.shape,
                                          dtype="float16", chunks=(1, *args.shape), fill_value=0,
                                          compressors=compressors_for(codec, 1))
                arrays[check] = array.with_config({"write_empty_chunks": not check})
                arrays[check][:] = feats  # first write: files created, untimed
            best = dict.fromkeys(arrays, 0.0)
            for _ in range(args.repeats):
                for check, array in arrays.items():
                    t0 = time.perf_counter()
                    array[:] = feats
                    best[check] = max(best[check], args.samples / (time.perf_counter() - t0))
            assert all(np.array_equal(a[:], feats) for a in arrays.values())
            rows.append({"codec": codec, "chunks_per_s_checked": best[True], "chunks_per_s_unchecked": best[False],
                         "speedup": best[False] / best[True],
                         "mb_per_s_unchecked": best[False] * feats[0].nbytes / 1e6})
    print(table(rows, ["codec", "chunks_per_s_checked", "chunks_per_s_unchecked", "speedup", "mb_per_s_unchecked"],
                {"chunks_per_s_checked": ".0f", "chunks_per_s_unchecked": ".0f", "speedup": ".2f",
                 "mb_per_s_unchecked": ".0f"}))
    write_json(args.out, {"command": " ".join(["python -m benchmarks.store_write", *(argv or [])]),
                          "machine": machine(), "shape": list(args.shape), "samples": args.samples,
                          "zarr": zarr.__version__, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
