"""Batches of cached features + target pixels, straight from the Zarr stores.

The encoder never runs here.  A split's features are loaded into RAM once when
they fit ``ram_cache_gb`` (reading is then free); otherwise each batch is read
with one orthogonal selection per store on a background thread, so chunk
decompression overlaps the training step.  When batches are feature windows
(``crop``), the RAM copy is held channels-last (N, h, w, C): a window's channels are then
contiguous, so a batch of windows is gathered from whole rows instead of one value per
channel (about twice the delivery rate for 2,048 3×3 windows of vgg16/block1).  Whole-map
batches keep the stored (N, C, h, w) layout, which loads faster and delivers as fast.

For a CUDA ``device`` a batch leaves the loader on the device.  A RAM-cached split that
also fits ``device_cache_gb`` (and half the device's free memory) is held on the device
itself, float16 features and uint8 pixels, and each batch is gathered there: no host
copy, no loader thread.  Otherwise a batch is read on the background thread (RAM-cached
splits too), kept as float16 features and uint8 pixels in page-locked memory, copied on
a side stream with ``non_blocking`` and converted to float32 on the GPU
(:mod:`featinv.precision`).  On the CPU nothing of that happens unless asked for.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from featinv import precision
from featinv.store.prefetch import prefetched

__all__ = ["FeatureBatches", "FeatureCrop"]

log = logging.getLogger(__name__)

_THREADS = "featinv-loader"  # names the loader's read-ahead threads


@dataclasses.dataclass(frozen=True)
class FeatureCrop:
    """Train on random windows of the feature maps instead of whole maps.

    Each sample gets its own window: ``size``×``size`` positions anywhere in the map, plus
    ``margin`` positions of context on each side, edge-replicated where they fall outside
    the map (decoders that declare a context margin pad that way too, so border positions
    train exactly as they are used).  The pixels returned are those under the inner
    ``size``×``size`` positions (``scale`` pixels per position).
    """

    size: int
    scale: int
    margin: int = 0


class FeatureBatches:
    """Iterable over ``(feats, pixels01)`` batches of one split.

    Args:
        feature_arrays: one (N, C, h, w) float16 array per encoder (Zarr or NumPy).
        pixel_array: the (N, H, W, 3) uint8 target pixels of the same samples.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (seeded by ``seed`` + epoch).
        seed: shuffling seed.
        ram_cache_gb: load features into RAM when their total size is at most this.
        samples_per_epoch: draw this many samples per epoch (a seeded random subset, or
            several reshuffled passes when larger than the split; None = every sample once).
        drop_last: drop a final incomplete batch (keeps BatchNorm statistics sane).
        crop: cut one random feature window per sample (see :class:`FeatureCrop`), in
            float16 before conversion, so small windows cost little to load.
        device: where the batches are delivered; CUDA gets pinned, asynchronous copies
            (see the module docstring), anything else CPU tensors as before.
        read_threads: background threads reading batches (in order); more than one lets
            several batches decompress at once when streaming feeds a fast GPU.
        device_cache_gb: hold a RAM-cached split on ``device`` (features and pixels) when its
            features are at most this size and, on CUDA, half the device's free memory; its
            batches are then gathered on the device.  The batches are the same, only where
            they are made differs (0 = never).

    Yields:
        ``feats``: a list of float32 tensors (B, C, h, w), one per encoder;
        ``pixels01``: float32 (B, 3, H, W) in [0, 1]; both on ``device``.
    """

    def __init__(
        self,
        feature_arrays: Sequence,
        pixel_array,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        ram_cache_gb: float = 8.0,
        samples_per_epoch: int | None = None,
        drop_last: bool = False,
        crop: FeatureCrop | None = None,
        device: torch.device | str | None = None,
        read_threads: int = 1,
        device_cache_gb: float = 0.0,
    ) -> None:
        n = int(pixel_array.shape[0])
        for arr in feature_arrays:
            if int(arr.shape[0]) != n:
                raise ValueError(f"feature array has {arr.shape[0]} samples, pixels {n}")
        self.n = n
        self.per_epoch = n if samples_per_epoch is None else samples_per_epoch
        self.crop = crop
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last and self.per_epoch > batch_size
        self.epoch = 0
        self.device = torch.device("cpu" if device is None else device)
        self.read_threads = read_threads
        self._copy: precision.DeviceCopy | None = None  # made on first use (needs CUDA)
        feature_bytes = sum(int(np.prod(a.shape[1:])) * 2 * self.n for a in feature_arrays)
        self.in_ram = feature_bytes <= ram_cache_gb * 2**30
        self.map_hw = tuple(int(v) for v in feature_arrays[0].shape[-2:]) if feature_arrays else (0, 0)
        self.nhwc = self.in_ram and crop is not None  # the RAM copy's layout (module docstring)
        if self.in_ram:
            self.features = [_channels_last_copy(a, self.n) if self.nhwc else np.asarray(a[: self.n])
                             for a in feature_arrays]
        else:
            log.info("features (%.1f GB) exceed ram_cache_gb: streaming from the store", feature_bytes / 2**30)
            if crop is not None:  # every window costs a whole-map read when streaming
                log.warning("training on feature windows while streaming reads a whole map per window; "
                            "set train.ram_cache_gb ≥ %.1f to keep the split in RAM", feature_bytes / 2**30 + 0.1)
            self.features = list(feature_arrays)
        self.pixels = np.asarray(pixel_array[: self.n])  # uint8: small next to the features
        # The split on the device itself (None: gathered on the host): a batch is then an index_select there.
        self.resident: tuple[list[torch.Tensor], torch.Tensor] | None = None
        if self.in_ram and _fits_on(self.device, feature_bytes + self.pixels.nbytes, device_cache_gb):
            self.resident = ([torch.from_numpy(f).to(self.device) for f in self.features],
                             torch.from_numpy(self.pixels).to(self.device))
            log.info("features (%.2f GB) held on %s", feature_bytes / 2**30, self.device)

    def __len__(self) -> int:
        full, rest = divmod(self.per_epoch, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def whole_maps(self, batch_size: int = 8) -> FeatureBatches:
        """One in-order pass over every sample, whole maps, no cropping (shares the cached arrays)."""
        view = copy.copy(self)
        view.crop, view.shuffle, view.per_epoch, view.drop_last = None, False, self.n, False
        view.batch_size = batch_size
        view.device = torch.device("cpu")  # closed-form warm starts run on the CPU
        view.resident = None  # ... from the host copy
        return view

    def _order(self) -> np.ndarray:
        passes = -(-self.per_epoch // self.n)  # more samples than the split: several passes
        if not self.shuffle:
            return np.tile(np.arange(self.n), passes)[: self.per_epoch]
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.concatenate([rng.permutation(self.n) for _ in range(passes)])[: self.per_epoch]

    def _read(self, index: np.ndarray, windows: np.ndarray | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        order = np.argsort(index, kind="stable")  # sorted reads touch chunks in order
        index = index[order]
        windows = None if windows is None else windows[order]
        if self.resident is not None:  # gathered on the device: the same samples, in the same order
            features, pixels = self.resident
            if windows is not None:
                return _float_batch(*self._cut(features, index, index, windows, pixels), nhwc=self.nhwc)
            at = _indices_on(self.device, index)
            return _float_batch([f.index_select(0, at) for f in features], pixels.index_select(0, at),
                                nhwc=self.nhwc)
        selected = False  # whether ``arrays`` already hold exactly this batch, in order
        if self.in_ram:
            arrays, rows = self.features, index
        else:  # one orthogonal selection per store (unique, sorted), then rows of it
            unique = np.unique(index)
            arrays, rows = [np.asarray(f.oindex[unique]) for f in self.features], np.searchsorted(unique, index)
            selected = len(unique) == len(index)
        if windows is None:
            feats = arrays if selected else [a[rows] for a in arrays]
            pixels = self.pixels[index]
        else:
            feats, pixels = self._cut(arrays, rows, index, windows, self.pixels)
        if self.device.type == "cuda":  # float16/uint8 to the device; float32 is made there (_arrive)
            return self._copy.send([precision.pinned(f) for f in feats] + [precision.pinned(pixels)])
        return _float_batch([torch.from_numpy(f) for f in feats], torch.from_numpy(pixels), nhwc=self.nhwc)

    def _arrive(self, sent) -> tuple[list[torch.Tensor], torch.Tensor]:
        """A batch ``_read`` sent to CUDA, usable on the current stream, as float32."""
        *feats, pixels = self._copy.receive(*sent)
        return _float_batch(feats, pixels, nhwc=self.nhwc)

    def _cut(self, arrays, rows: np.ndarray, index: np.ndarray, windows: np.ndarray, pixel_array):
        """Each sample's window of features (with context margin) and the pixels under its centre.

        One fancy-indexing gather per array (no per-sample Python loop), so batches of
        thousands of tiny windows cost little.  ``arrays`` and ``pixel_array`` are NumPy
        arrays, or tensors on the device (the split held there): the same gathers either way.
        Features come back (B, side, side, C) from channels-last arrays (``self.nhwc``), else
        (B, C, side, side).
        """
        size, scale, margin = self.crop.size, self.crop.scale, self.crop.margin
        side = size + 2 * margin
        height, width = self.map_hw
        # Context beyond the map edge repeats the edge (replicate padding).
        feat_y = np.clip(windows[:, 0, None] + np.arange(side), 0, height - 1)[:, :, None]  # (B, side, 1)
        feat_x = np.clip(windows[:, 1, None] + np.arange(side), 0, width - 1)[:, None, :]  # (B, 1, side)
        # Advanced indices around a slice put their dims first: (B, side, side, C) → (B, C, side, side).
        pix = np.arange(size * scale)
        pix_y = ((windows[:, 0] + margin) * scale)[:, None, None] + pix[None, :, None]
        pix_x = ((windows[:, 1] + margin) * scale)[:, None, None] + pix[None, None, :]
        if isinstance(pixel_array, torch.Tensor):  # the split held on the device: rows are the sample indices
            index, feat_y, feat_x, pix_y, pix_x = (_indices_on(pixel_array.device, i)
                                                   for i in (index, feat_y, feat_x, pix_y, pix_x))
            rows = index
        if self.nhwc:  # channels-last maps: each position's channels are one contiguous row
            feats = [a[rows[:, None, None], feat_y, feat_x] for a in arrays]
        else:  # advanced indices around a slice put their dims first: (B, side, side, C) → (B, C, side, side)
            feats = [np.ascontiguousarray(a[rows[:, None, None], :, feat_y, feat_x].transpose(0, 3, 1, 2))
                     for a in arrays]
        pixels = pixel_array[index[:, None, None], pix_y, pix_x]  # (B, size·scale, size·scale, 3)
        return feats, pixels

    def _windows(self, count: int) -> np.ndarray | None:
        """Top-left corners of this epoch's random windows, one per sample (seeded)."""
        if self.crop is None:
            return None
        height, width = self.map_hw
        size, margin = self.crop.size, self.crop.margin
        if size > min(height, width):
            raise ValueError(f"feature crop {size} exceeds the {height}×{width} feature map")
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        # Corners of the context window: the inner crop covers every position, borders included.
        return np.stack([rng.integers(-margin, height - size - margin + 1, count),
                         rng.integers(-margin, width - size - margin + 1, count)], 1)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        order = self._order()
        windows = self._windows(len(order))
        self.epoch += 1
        starts = range(0, len(order), self.batch_size)
        batches = [(order[i : i + self.batch_size], None if windows is None else windows[i : i + self.batch_size])
                   for i in starts]
        if self.drop_last and len(batches[-1][0]) < self.batch_size:
            batches.pop()
        if self.resident is not None:  # gathered where the step runs: nothing to overlap
            for index, corners in batches:
                yield self._read(index, corners)
            return
        if self.device.type == "cuda":  # every batch through the background thread(s), then onto the GPU
            if self._copy is None:
                self._copy = precision.DeviceCopy(self.device)
            stream = prefetched(lambda batch: self._read(*batch), batches, self.read_threads, name=_THREADS)
            try:
                for sent in stream:
                    yield self._arrive(sent)
            finally:
                stream.close()
            return
        if self.in_ram and self.crop is None:  # whole maps from RAM: reading is a cheap slice
            for index, corners in batches:
                yield self._read(index, corners)
            return
        # Streaming reads, or window gathers: on a background thread, overlapping the step.
        yield from prefetched(lambda batch: self._read(*batch), batches, self.read_threads, name=_THREADS)


def _indices_on(device: torch.device, indices: np.ndarray) -> torch.Tensor:
    """``indices`` on ``device``, without stalling the host.

    A copy from ordinary (pageable) memory to CUDA waits for the GPU to finish its queued work,
    so every batch would wait for the previous step; from page-locked memory it is queued
    like the rest (PyTorch keeps the page-locked block until the copy is done).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(indices))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _fits_on(device: torch.device, nbytes: int, budget_gb: float) -> bool:
    """Whether ``nbytes`` may be held on ``device``: within ``budget_gb`` and, on CUDA, half its free memory.

    Half, because the step's activations need room too, and so do other study cells sharing the GPU.
    """
    if nbytes > budget_gb * 2**30:
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes > free / 2:
            log.info("features (%.2f GB) exceed half of %s's free memory: gathered on the host", nbytes / 2**30, device)
            return False
    return True


def _float_batch(feats: list[torch.Tensor], pixels_nhwc: torch.Tensor,
                 nhwc: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """float16 features → float32 (B, C, h, w); uint8 (B, H, W, 3) pixels → float32 (B, 3, H, W) in [0, 1].

    Feature maps come out channels_last: the layout the training step hands decoders
    (``featinv.training.train.decoder_inputs``), which otherwise costs a second pass over the
    batch.  ``nhwc``: the features arrive (B, h, w, C), as a window loader's RAM copy holds them, and a
    permuted view of them already is that layout; (B, C, h, w) ones are converted and
    transposed in one pass.
    """
    if nhwc:
        feats = [f.permute(0, 3, 1, 2) for f in feats]
    return ([f.to(dtype=torch.float32, memory_format=torch.channels_last) if f.dim() == 4 else f.float()
             for f in feats], pixels_nhwc.permute(0, 3, 1, 2).float().div_(255.0))


def _channels_last_copy(array, n: int, block: int = 64) -> np.ndarray:
    """The first ``n`` (C, h, w) maps of ``array`` (Zarr or NumPy) as one (n, h, w, C) array.

    Read and transposed ``block`` maps at a time, so the split is held once, not twice.
    """
    channels, height, width = (int(v) for v in array.shape[1:])
    out = np.empty((n, height, width, channels), dtype=array.dtype)
    for begin in range(0, n, block):
        out[begin : begin + block] = np.asarray(array[begin : min(begin + block, n)]).transpose(0, 2, 3, 1)
    return out
