"""Feature-store write rate: Zarr chunks/s per codec, with and without the empty-chunk check.

Why it exists: on the H200, ``extract_features`` stored vgg16/block1 at 105 images/s while the
encoder computed 20,215/s, so the store's writes are extraction's limit. By default Zarr
compares every chunk with the fill value before writing it (``write_empty_chunks=False``),
which for float16 is a slow element-wise comparison; features are never one whole all-zero
map, so featinv skips it. This times exactly that write: ``array[:] = x`` of ``--samples``
one-sample chunks of post-ReLU Gaussian float16 features (vgg16/block1-shaped by default),
best of ``--repeats``, per codec as ``extract.codec`` names them, all ways interleaved. Beside
it, the same unchecked write split over ``--threads`` writer threads, and over as many writer
processes (each holds its share of the features already, as a writer fed through shared
memory would: what processes cost to feed is not in it), and the codec alone (numcodecs'
Blosc, as the store configures it) on one thread and on ``--threads``: whether Zarr's write
path, rather than the codec, keeps the chunks to one core, and whether processes get round it.

    python -m benchmarks.store_write                      # (64, 112, 112) float16, 64 samples
    python -m benchmarks.store_write --shape 256 56 56

Prints a table and writes benchmarks/results/store_write.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from numcodecs import Blosc

from benchmarks.common import RESULTS, machine, table, write_json
from featinv.zarr_utils import CODECS, compressors_for


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 112, 112), metavar=("C", "H", "W"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codecs", nargs="+", default=list(CODECS))
    p.add_argument("--threads", type=int, default=max(2, os.cpu_count() or 1),
                   help="threads for the threaded writes and encodes (default: the CPU count)")
    p.add_argument("--out", type=Path, default=RESULTS / "store_write.json")
    args = p.parse_args(argv)
    feats = _features(args.samples, args.shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.threads) as pool, \
            ProcessPoolExecutor(args.threads, initializer=_hold_features,
                                initargs=(args.samples, tuple(args.shape))) as processes:
        for codec in args.codecs:
            arrays = {}
            for check in (True, False):  # check = Zarr's default: compare each chunk with the fill value
                array = zarr.create_array(store=str(Path(tmp) / f"{codec}-{check}"), shape=feats.shape,
                                          dtype="float16", chunks=(1, *args.shape), fill_value=0,
                                          compressors=compressors_for(codec, 1))
                arrays[check] = array.with_config({"write_empty_chunks": not check})
                arrays[check][:] = feats  # first write: files created, untimed
            unchecked = arrays[False]
            parts = np.array_split(np.arange(args.samples), args.threads)

            def write_part(rows_: np.ndarray, array=unchecked) -> None:
                array[rows_[0]:rows_[-1] + 1] = feats[rows_[0]:rows_[-1] + 1]

            path = str(Path(tmp) / f"{codec}-False")
            list(processes.map(_process_write, [path] * len(parts), [(p[0], p[-1] + 1) for p in parts]))  # warm

            # Each way of writing all the chunks once; interleaved so load hits them alike.
            ways = {"checked": lambda: arrays[True].__setitem__(slice(None), feats),
                    "unchecked": lambda: unchecked.__setitem__(slice(None), feats),
                    "unchecked_threads": lambda: list(pool.map(write_part, parts)),
                    "unchecked_processes": lambda: list(processes.map(
                        _process_write, [path] * len(parts), [(p[0], p[-1] + 1) for p in parts]))}
            if codec != "none":  # the codec alone, outside Zarr: what parallel encoding could reach
                blosc = Blosc(cname=codec, clevel=1, shuffle=Blosc.SHUFFLE, typesize=2)
                ways["codec_alone"] = lambda: [blosc.encode(f) for f in feats]
                ways["codec_alone_threads"] = lambda: list(pool.map(blosc.encode, feats))
            best = dict.fromkeys(ways, 0.0)
            for _ in range(args.repeats):
                for name, way in ways.items():
                    t0 = time.perf_counter()
                    way()
                    best[name] = max(best[name], args.samples / (time.perf_counter() - t0))
            assert all(np.array_equal(a[:], feats) for a in arrays.values())
            rows.append({"codec": codec, **{f"chunks_per_s_{name}": rate for name, rate in best.items()},
                         "speedup": best["unchecked"] / best["checked"],
                         "mb_per_s_unchecked": best["unchecked"] * feats[0].nbytes / 1e6})
    columns = ["codec", *(f"chunks_per_s_{name}" for name in ("checked", "unchecked", "unchecked_threads",
                                                               "unchecked_processes", "codec_alone",
                                                               "codec_alone_threads")),
               "speedup", "mb_per_s_unchecked"]
    print(f"{args.threads} threads where a column says so")
    print(table(rows, columns, {c: ".2f" if c == "speedup" else ".0f" for c in columns[1:]}))
    write_json(args.out, {"command": " ".join(["python -m benchmarks.store_write",
                                               *(sys.argv[1:] if argv is None else argv)]),
                          "machine": machine(), "shape": list(args.shape), "samples": args.samples,
                          "threads": args.threads,
                          "zarr": zarr.__version__, "rows": rows})
    return rows


def _features(samples: int, shape) -> np.ndarray:
    """Post-ReLU Gaussian float16 maps, the same for every caller."""
    rng = np.random.default_rng(0)
    return np.maximum(rng.standard_normal((samples, *shape), dtype=np.float32), 0).astype(np.float16)


_HELD: dict[str, np.ndarray] = {}


def _hold_features(samples: int, shape: tuple[int, ...]) -> None:
    _HELD["feats"] = _features(samples, shape)


def _process_write(path: str, bounds: tuple[int, int]) -> None:
    """In a writer process: its rows of the held features into the (existing) array at ``path``."""
    array = zarr.open_array(store=path, mode="r+").with_config({"write_empty_chunks": True})
    array[bounds[0]:bounds[1]] = _HELD["feats"][bounds[0]:bounds[1]]


if __name__ == "__main__":
    main()
