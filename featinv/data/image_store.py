"""The prepared-image store: uint8 pixels and ids per split, in Zarr.

Layout of ``images.zarr``::

    train/pixels  (N_train · views, 224, 224, 3) uint8   seeded augmented views
    val/pixels    (N_val, 224, 224, 3) uint8             centre crops
    test/pixels   (N_test, 224, 224, 3) uint8            centre crops
    attrs: ids per split, source image per sample, preprocessing, fingerprint,
           duplicates_across_splits, upsampled

Targets for training are these pixels / 255 — never ImageNet-normalised
tensors (the published study's mistake).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from featinv.config import DataConfig
from featinv.errors import DataSourceError, ParamsError, StorageError, StoreIncompleteError
from featinv.data.images import (CHANNEL_SHUFFLE_PROBABILITY, OTHER_CHANNEL_ORDERS, center_crop, display_path,
                                 resize_square, training_view, view_rng)
from featinv.data.sources import SPLITS, SourceImage, SourcePools, collect_images
from featinv.zarr_utils import commit_dir, compressors_for, digest, open_group, partial_path, remove_tree

__all__ = ["ImageStore", "prepare_images", "PrepareReport", "dataset_mean_image"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

_SHOWN_IDS = 5  # ids quoted in a warning; the store attrs hold them all


@dataclasses.dataclass(frozen=True)
class PrepareReport:
    """What :func:`prepare_images` wrote."""

    path: Path
    counts: dict[str, int]
    fingerprint: str


class ImageStore:
    """Read access to a prepared image store.

    Raises (on open):
        StoreIncompleteError: the path is not a complete featinv image store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreIncompleteError(
                f"{self.path}: no image store here; run `dvc repro prepare` (or `featinv prepare`)"
            )
        self.group = open_group(self.path)
        attrs = dict(self.group.attrs)
        if attrs.get("featinv") != "images" or not attrs.get("complete"):
            raise StoreIncompleteError(f"{self.path}: not a complete featinv image store")
        self.attrs = attrs

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def crop(self) -> int:
        return int(self.attrs["preprocessing"]["crop"])

    def ids(self, split: str) -> list[str]:
        """Sample ids of ``split`` (train ids carry the view: ``image#v2``)."""
        return list(self.attrs["ids"][split])

    def count(self, split: str) -> int:
        return len(self.attrs["ids"][split])

    def pixels(self, split: str):
        """The (N, H, W, 3) uint8 Zarr array of ``split``."""
        return self.group[f"{split}/pixels"]


def prepare_images(
    cfg: DataConfig,
    seed: int,
    out: str | Path,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 4,
    pools: SourcePools | None = None,
) -> PrepareReport:
    """Collect, preprocess and store the images of every split.

    Args:
        cfg: the ``data`` params.
        seed: split and augmentation seed.
        out: the image store to write (``data/prepared/images.zarr``).
        progress: called as ``progress(done, total)`` after each image.
        workers: decoding threads (PIL releases the GIL while decoding/resizing).
        pools: the images of each split, instead of ``cfg.source``'s (a split may be empty:
            a held-out test set has only ``test``).

    Images whose decoded pixels are identical in train/val and test are
    reported (a warning, and ``attrs["duplicates_across_splits"]``): their test
    scores are not held out.  Images smaller on their shorter side than the size they are
    resized to (``cfg.resize``; for training views up to ``cfg.resize`` × ``cfg.train_scale[1]``)
    are upsampled; one warning counts them (``attrs["upsampled"]``).

    Raises:
        DataSourceError / BadImageError / ParamsError: from the source; no store is left behind.
        StorageError: writing the store failed (disk full, permission denied,
            read-only filesystem); no store or ``.partial`` is left behind.
    """
    out = Path(out)  # (DataConfig itself refuses data.crop > data.resize)
    pools = collect_images(cfg, seed) if pools is None else {s: list(pools.get(s, [])) for s in SPLITS}
    partial = partial_path(out)
    with _storage_errors(out):
        remove_tree(partial)
    total = sum(len(pools[s]) for s in SPLITS)
    done = 0
    ids: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    pixel_digests: dict[str, list[tuple[str, str]]] = {}  # split → (image id, sha256 of its decoded pixels)
    upsampled: dict[str, list[str]] = {}
    content = hashlib.sha256()
    try:
        with _storage_errors(out):
            group = open_group(partial, mode="w")
        for split in SPLITS:
            views = cfg.train_views if split == "train" else 1

            def make(
                image: SourceImage, split: str = split, views: int = views
            ) -> tuple[list[np.ndarray], str, bool]:
                rgb = image.load()
                # Hashed here, where the pixels are already decoded, to spot test leakage.
                pixels_sha = hashlib.sha256(str(rgb.shape).encode())
                pixels_sha.update(np.ascontiguousarray(rgb).tobytes())
                small = min(rgb.shape[:2]) < _largest_resize(cfg, split)
                resized = resize_square(rgb, cfg.resize)
                if split != "train":
                    crops = [center_crop(resized, cfg.crop)]
                else:
                    crops = [training_view(rgb, cfg.resize, cfg.crop, cfg.train_scale, view_rng(seed, image.id, v),
                                           resized, cfg.train_orientations, cfg.train_channel_orders)
                             for v in range(views)]
                return crops, pixels_sha.hexdigest(), small

            n = len(pools[split]) * views
            with _storage_errors(out):
                pixels = group.create_array(
                    f"{split}/pixels",
                    shape=(n, cfg.crop, cfg.crop, 3),
                    chunks=(1, cfg.crop, cfg.crop, 3),
                    dtype="uint8",
                    compressors=compressors_for("zstd", clevel=3, typesize=1),
                )
            ids[split], sources[split], pixel_digests[split], upsampled[split] = [], [], [], []
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for i, (image, (crops, pixels_sha, small)) in enumerate(
                    zip(pools[split], pool.map(make, pools[split]))
                ):
                    batch = np.stack(crops)
                    with _storage_errors(out):
                        # One chunk per call: if a write fails, Zarr has no sibling chunk
                        # writes still in flight that could land after the cleanup.
                        for v in range(views):
                            pixels[i * views + v] = batch[v]
                    content.update(batch.tobytes())
                    for v in range(views):
                        ids[split].append(f"{image.id}#v{v}" if split == "train" else image.id)
                        sources[split].append(image.id)
                    pixel_digests[split].append((image.id, pixels_sha))
                    if small:
                        upsampled[split].append(image.id)
                    done += 1
                    if progress:
                        progress(done, total)
            finally:
                # On failure, drop queued decodes instead of finishing them all first.
                pool.shutdown(wait=True, cancel_futures=True)
        preprocessing = {
            "resize": cfg.resize,
            "crop": cfg.crop,
            "interpolation": "bicubic",
            "train": f"random crop {cfg.crop} + hflip p=0.5, {cfg.train_views} views" + _scale_text(cfg)
                     + _orientation_text(cfg) + _channel_order_text(cfg),
            "eval": f"centre crop {cfg.crop}",
        }
        fingerprint = digest(
            {"format": FORMAT_VERSION, "ids": ids, "preprocessing": preprocessing,
             "seed": seed, "pixels_sha256": content.hexdigest()}
        )
        duplicates = _duplicates_across_splits(pixel_digests)
        _warn_about(duplicates, upsampled, cfg, total)
        with _storage_errors(out):
            group.attrs.update(
                {
                    "featinv": "images",
                    "format": FORMAT_VERSION,
                    "source": cfg.source,
                    "data": dataclasses.asdict(cfg),  # what training compares its params with
                    "seed": seed,
                    "ids": ids,
                    "source_ids": sources,
                    "preprocessing": preprocessing,
                    "fingerprint": fingerprint,
                    "duplicates_across_splits": duplicates,
                    "upsampled": upsampled,
                    "complete": True,
                }
            )
            commit_dir(partial, out)
    except BaseException:
        _discard(partial)  # never leave a half-written store behind
        raise
    counts = {s: len(ids[s]) for s in SPLITS}
    log.info("prepared %s: %s", out, counts)
    return PrepareReport(out, counts, fingerprint)



def _scale_text(cfg: DataConfig) -> str:
    """The scale augmentation in words; empty for the published protocol, whose text (and so
    every existing store's fingerprint) stays as it was."""
    low, high = cfg.train_scale
    return "" if low == high == 1.0 else f", each view resized to ({cfg.resize}·s)², s ~ U[{low:g}, {high:g}]"


def _orientation_text(cfg: DataConfig) -> str:
    """The turns of the training views in words; empty for the published flips (as _scale_text)."""
    return "" if cfg.train_orientations == "horizontal" else ", each view turned by k·90°, k ~ U{0..3}"


def _channel_order_text(cfg: DataConfig) -> str:
    """The channel orders of the training views in words; empty for the published R, G, B (as _scale_text)."""
    p = CHANNEL_SHUFFLE_PROBABILITY[cfg.train_channel_orders]
    return "" if p == 0 else f", channels put in one of the {len(OTHER_CHANNEL_ORDERS)} other orders with p={p:g}"


MEAN_CHUNK_IMAGES = 64  # 64 × 224² × 3 uint8 ≈ 9.6 MB read at a time


def dataset_mean_image(train_pixels, chunk_images: int = MEAN_CHUNK_IMAGES) -> torch.Tensor:
    """The mean of the training split's images, read ``chunk_images`` at a time.

    Args:
        train_pixels: uint8 array (N, H, W, 3), NumPy or Zarr (anything sliceable along axis 0
            with ``shape`` and ``dtype``); only one chunk is in memory at a time.
        chunk_images: images per read.

    Returns:
        (3, H, W) float32 tensor in [0, 1].

    Raises:
        DataSourceError: the array is empty, not (N, H, W, 3) or not uint8.
        ParamsError: ``chunk_images`` is not a positive integer.
    """
    shape, dtype = tuple(train_pixels.shape), np.dtype(train_pixels.dtype)
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise DataSourceError(
            f"training pixels have shape {shape} and dtype {dtype}; expected uint8 (N, H, W, 3) images"
        )
    if shape[0] == 0:
        raise DataSourceError("the training split has no images; the dataset-mean baseline needs at least one")
    if not isinstance(chunk_images, int) or chunk_images < 1:
        raise ParamsError(f"chunk_images is {chunk_images!r}; expected a positive integer")
    import torch  # here, not at import: preparing images needs no torch

    # float64 sums of uint8 values are exact far beyond any dataset size we use.
    total = np.zeros(shape[1:], dtype=np.float64)
    for start in range(0, shape[0], chunk_images):
        total += np.asarray(train_pixels[start : start + chunk_images], dtype=np.float64).sum(axis=0)
    mean01_hwc = total / (shape[0] * 255.0)
    return torch.from_numpy(mean01_hwc).permute(2, 0, 1).float().contiguous()


def _duplicates_across_splits(pixel_digests: dict[str, list[tuple[str, str]]]) -> list[dict[str, str]]:
    """Test images whose decoded pixels equal a train or val image's: ``{"test", "split", "id"}``."""
    seen: dict[str, tuple[str, str]] = {}
    for split in ("train", "val"):
        for image_id, sha in pixel_digests[split]:
            seen.setdefault(sha, (split, image_id))
    return [
        {"test": image_id, "split": seen[sha][0], "id": seen[sha][1]}
        for image_id, sha in pixel_digests["test"]
        if sha in seen
    ]


def _largest_resize(cfg: DataConfig, split: str) -> int:
    """The largest side an image of ``split`` is resized to before cropping.

    ``data.resize``; for training views up to ``data.resize`` × ``data.train_scale``'s upper
    bound, so an image between the two has some of its training views upsampled.
    """
    return round(cfg.resize * (cfg.train_scale[1] if split == "train" else 1.0))


def _warn_about(duplicates: list[dict[str, str]], upsampled: dict[str, list[str]], cfg: DataConfig,
                total: int) -> None:
    if duplicates:
        pairs = ", ".join(f"test {d['test']!r} = {d['split']} {d['id']!r}" for d in duplicates[:_SHOWN_IDS])
        log.warning(
            "%d test image(s) are pixel-identical to train/val images (test leakage: their scores "
            "are not held out): %s%s; remove the copies from one split (all are listed in the "
            "store attrs 'duplicates_across_splits')",
            len(duplicates), pairs, ", …" if len(duplicates) > _SHOWN_IDS else "",
        )
    small = [image_id for split in SPLITS for image_id in upsampled[split]]
    if small:
        largest = _largest_resize(cfg, "train")
        views = (f" (training views: up to data.resize × data.train_scale[1] = {largest}×{largest})"
                 if largest != cfg.resize else "")
        log.warning(
            "%d of %d source image(s) have a shorter side below the size they are resized to, "
            "data.resize=%d%s, and were upsampled (bicubic), e.g. %s; their targets are partly "
            "interpolation (listed in the store attrs 'upsampled')",
            len(small), total, cfg.resize, views, ", ".join(map(repr, small[:_SHOWN_IDS])),
        )


@contextmanager
def _storage_errors(out: Path):
    """Turn an OSError while writing the store into one StorageError naming it and the fix."""
    try:
        yield
    except OSError as exc:
        where = display_path(out.parent.resolve())
        code = errno.errorcode.get(exc.errno or 0, "")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space on {where} or set --out elsewhere"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            fix = f"make {where} writable or set --out elsewhere"
        elif exc.errno == errno.EROFS:
            fix = f"{where} is on a read-only filesystem: set --out elsewhere"
        else:
            fix = f"check {where} or set --out elsewhere"
        detail = exc.strerror or str(exc)
        if exc.filename is not None:
            detail += f" at {display_path(exc.filename)}"
        raise StorageError(
            f"{display_path(out)}: writing the image store failed ({code + ': ' if code else ''}{detail}); "
            f"{fix}"
        ) from None


def _discard(partial: Path) -> None:
    """Remove a half-written store, after any write already handed to Zarr's I/O thread has landed."""
    for attempt in range(2):
        try:
            remove_tree(partial)
        except OSError as exc:  # files appeared mid-removal, or no permission to delete
            if attempt:
                log.warning("could not remove the half-written %s (%s); delete it by hand",
                            display_path(partial), exc)
                return
        # A chunk write interrupted by Ctrl-C keeps running on Zarr's I/O thread
        # and can recreate files just removed; look again once it has had time.
        time.sleep(0.05)
        if not partial.exists():
            return
    log.warning("could not remove the half-written %s; delete it by hand", display_path(partial))
