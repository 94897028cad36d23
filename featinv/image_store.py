"""The prepared-image store: uint8 pixels and ids per split, in Zarr.

Layout of ``images.zarr``::

    train/pixels  (N_train · views, 224, 224, 3) uint8   seeded augmented views
    val/pixels    (N_val, 224, 224, 3) uint8             centre crops
    test/pixels   (N_test, 224, 224, 3) uint8            centre crops
    attrs: ids per split, source image per sample, preprocessing, fingerprint

Targets for training are these pixels / 255 — never ImageNet-normalised
tensors (the published study's mistake).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featinv.config import DataConfig
from featinv.errors import StoreIncompleteError
from featinv.images import center_crop, random_view, resize_square, view_rng
from featinv.sources import SPLITS, SourceImage, collect_images
from featinv.zarr_utils import commit_dir, compressors_for, digest, open_group, partial_path, remove_tree

__all__ = ["ImageStore", "prepare_images", "PrepareReport"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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
) -> PrepareReport:
    """Collect, preprocess and store the images of every split.

    Args:
        cfg: the ``data`` params.
        seed: split and augmentation seed.
        out: the image store to write (``data/prepared/images.zarr``).
        progress: called as ``progress(done, total)`` after each image.
        workers: decoding threads (PIL releases the GIL while decoding/resizing).

    Raises:
        DataSourceError / BadImageError / ParamsError: from the source; no store is left behind.
    """
    out = Path(out)
    if cfg.crop > cfg.resize:
        from featinv.errors import ParamsError

        raise ParamsError(f"`data.crop` ({cfg.crop}) must not exceed `data.resize` ({cfg.resize})")
    pools = collect_images(cfg, seed)
    partial = partial_path(out)
    remove_tree(partial)
    group = open_group(partial, mode="w")
    total = sum(len(pools[s]) for s in SPLITS)
    done = 0
    ids: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    content = hashlib.sha256()
    try:
        for split in SPLITS:
            views = cfg.train_views if split == "train" else 1

            def make(image: SourceImage, split: str = split, views: int = views) -> list[np.ndarray]:
                resized = resize_square(image.load(), cfg.resize)
                if split != "train":
                    return [center_crop(resized, cfg.crop)]
                return [random_view(resized, cfg.crop, view_rng(seed, image.id, v)) for v in range(views)]

            n = len(pools[split]) * views
            pixels = group.create_array(
                f"{split}/pixels",
                shape=(n, cfg.crop, cfg.crop, 3),
                chunks=(1, cfg.crop, cfg.crop, 3),
                dtype="uint8",
                compressors=compressors_for("zstd", clevel=3, typesize=1),
            )
            ids[split], sources[split] = [], []
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for i, (image, crops) in enumerate(zip(pools[split], pool.map(make, pools[split]))):
                    batch = np.stack(crops)
                    pixels[i * views : (i + 1) * views] = batch
                    content.update(batch.tobytes())
                    for v in range(views):
                        ids[split].append(f"{image.id}#v{v}" if split == "train" else image.id)
                        sources[split].append(image.id)
                    done += 1
                    if progress:
                        progress(done, total)
        preprocessing = {
            "resize": cfg.resize,
            "crop": cfg.crop,
            "interpolation": "bicubic",
            "train": f"random crop {cfg.crop} + hflip p=0.5, {cfg.train_views} views",
            "eval": f"centre crop {cfg.crop}",
        }
        fingerprint = digest(
            {"format": FORMAT_VERSION, "ids": ids, "preprocessing": preprocessing,
             "seed": seed, "pixels_sha256": content.hexdigest()}
        )
        group.attrs.update(
            {
                "featinv": "images",
                "format": FORMAT_VERSION,
                "source": cfg.source,
                "seed": seed,
                "ids": ids,
                "source_ids": sources,
                "preprocessing": preprocessing,
                "fingerprint": fingerprint,
                "complete": True,
            }
        )
    except BaseException:
        remove_tree(partial)  # never leave a half-written store behind
        raise
    commit_dir(partial, out)
    counts = {s: len(ids[s]) for s in SPLITS}
    log.info("prepared %s: %s", out, counts)
    return PrepareReport(out, counts, fingerprint)
