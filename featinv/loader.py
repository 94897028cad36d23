"""Batches of cached features + target pixels, straight from the Zarr stores.

The encoder never runs here.  A split's features are loaded into RAM once when
they fit ``ram_cache_gb`` (reading is then free); otherwise each batch is read
with one orthogonal selection per store on a background thread, so chunk
decompression overlaps the training step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["FeatureBatches"]

log = logging.getLogger(__name__)

_PREFETCH = 4


class FeatureBatches:
    """Iterable over ``(feats, pixels01)`` batches of one split.

    Args:
        feature_arrays: one (N, C, h, w) float16 array per encoder (Zarr or NumPy).
        pixel_array: the (N, H, W, 3) uint8 target pixels of the same samples.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (seeded by ``seed`` + epoch).
        seed: shuffling seed.
        ram_cache_gb: load features into RAM when their total size is at most this.
        samples_per_epoch: draw this many samples per epoch (a seeded random subset;
            None = every sample).
        drop_last: drop a final incomplete batch (keeps BatchNorm statistics sane).

    Yields:
        ``feats``: a list of float32 tensors (B, C, h, w), one per encoder;
        ``pixels01``: float32 (B, 3, H, W) in [0, 1].
    """

    def __init__(
        self,
        feature_arrays: Sequence,
        pixel_array,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        ram_cache_gb: float = 4.0,
        samples_per_epoch: int | None = None,
        drop_last: bool = False,
    ) -> None:
        n = int(pixel_array.shape[0])
        for arr in feature_arrays:
            if int(arr.shape[0]) != n:
                raise ValueError(f"feature array has {arr.shape[0]} samples, pixels {n}")
        self.n = n
        self.per_epoch = n if samples_per_epoch is None else min(n, samples_per_epoch)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last and self.per_epoch > batch_size
        self.epoch = 0
        feature_bytes = sum(int(np.prod(a.shape[1:])) * 2 * self.n for a in feature_arrays)
        self.in_ram = feature_bytes <= ram_cache_gb * 2**30
        if self.in_ram:
            self.features = [np.asarray(a[: self.n]) for a in feature_arrays]
        else:
            log.info("features (%.1f GB) exceed ram_cache_gb: streaming from the store", feature_bytes / 2**30)
            self.features = list(feature_arrays)
        self.pixels = np.asarray(pixel_array[: self.n])  # uint8: small next to the features

    def __len__(self) -> int:
        full, rest = divmod(self.per_epoch, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.per_epoch)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[: self.per_epoch]

    def _read(self, index: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        index = np.sort(index)  # sorted reads touch chunks in order
        if self.in_ram:
            feats = [torch.from_numpy(f[index]) for f in self.features]
        else:
            feats = [torch.from_numpy(np.asarray(f.oindex[index])) for f in self.features]
        pixels = torch.from_numpy(self.pixels[index]).permute(0, 3, 1, 2)
        return [f.float() for f in feats], pixels.float().div_(255.0)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        order = self._order()
        self.epoch += 1
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.in_ram:
            for index in batches:
                yield self._read(index)
            return
        yield from _prefetched(self._read, batches)


def _prefetched(read, batches: list[np.ndarray]) -> Iterator:
    """Run ``read`` over ``batches`` on a background thread, a few batches ahead."""
    ready: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()

    def work() -> None:
        try:
            for index in batches:
                if stop.is_set():
                    return
                ready.put(("ok", read(index)))
        except BaseException as exc:  # re-raised in the consumer
            ready.put(("error", exc))
        ready.put(("done", None))

    thread = threading.Thread(target=work, name="featinv-loader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = ready.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
