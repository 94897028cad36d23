"""Image sources, keyed by the ``data.source`` param: where the study's images come from.

A source yields three pools of :class:`SourceImage` (train / val / test), each
image a stable id plus a loader returning (H, W, 3) uint8 RGB.  Splits are
seeded and reproducible:

- ``sample`` — real photographs shipped inside the scikit-image wheel (no
  network), each cut into non-overlapping square tiles so train and test never
  share pixels.
- ``folder`` — any directory of images (``data.train_dir``, optional ``data.test_dir``).
- ``div2k`` — the official DIV2K archives: 640 train / 160 val from
  DIV2K_train_HR (seed 42), the 100 DIV2K_valid_HR images as test.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from featinv.config import DataConfig
from featinv.errors import DataSourceError, ParamsError
from featinv.images import is_image_path, read_rgb
from featinv.registry import Registry

__all__ = ["SourceImage", "SourcePools", "SOURCES", "collect_images", "split_pool", "SAMPLE_PHOTOS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Colour photographs bundled in the scikit-image wheel (loaded without network access).
SAMPLE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "stereo_motorcycle",
)


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One source image: a stable id (used for seeding and reports) and a pixel loader."""

    id: str
    load: Callable[[], np.ndarray]


SourcePools = dict[str, list[SourceImage]]
SourceFn = Callable[[DataConfig, int], SourcePools]

SOURCES: Registry[SourceFn] = Registry("data source", param="data.source")


def collect_images(cfg: DataConfig, seed: int) -> SourcePools:
    """The train/val/test pools of the configured source.

    Raises:
        UnknownNameError: unknown ``data.source``.
        DataSourceError: the source has no (or too few) images.
    """
    pools = SOURCES.get(cfg.source)(cfg, seed)
    for split in SPLITS:
        if not pools.get(split):
            raise DataSourceError(
                f"data source {cfg.source!r} produced no {split} images; "
                "add images or adjust data.val_fraction / data.test_fraction / data.max_images"
            )
    return pools


def split_pool(
    images: Sequence[SourceImage], fraction: float, seed: int
) -> tuple[list[SourceImage], list[SourceImage]]:
    """Split ``images`` into (rest, held_out) with ``round(len · fraction)`` held out (seeded)."""
    n_held = int(round(len(images) * fraction))
    order = np.random.default_rng(seed).permutation(len(images))
    held = sorted(order[:n_held].tolist())
    rest = sorted(order[n_held:].tolist())
    return [images[i] for i in rest], [images[i] for i in held]


# -------------------------------------------------------------------------------- the sources


@SOURCES.register("sample")
def _sample(cfg: DataConfig, seed: int) -> SourcePools:
    import skimage.data

    tiles: list[SourceImage] = []
    for name in SAMPLE_PHOTOS:
        photo = getattr(skimage.data, name)()
        if isinstance(photo, tuple):  # stereo_motorcycle → (left, right, disparity)
            photo = photo[0]
        photo = np.ascontiguousarray(photo[..., :3])
        for k, (top, left, side) in enumerate(_tile_grid(photo.shape[:2], cfg.sample_crops)):
            tile = photo[top : top + side, left : left + side]
            tiles.append(SourceImage(f"{name}_{k}", _constant(tile)))
    tiles = _cap(tiles, cfg.max_images)
    rest, test = split_pool(tiles, cfg.test_fraction, seed)
    train, val = split_pool(rest, cfg.val_fraction, seed)
    return {"train": train, "val": val, "test": test}


@SOURCES.register("folder")
def _folder(cfg: DataConfig, seed: int) -> SourcePools:
    if not cfg.train_dir:
        raise ParamsError("data.source is 'folder' but `data.train_dir` is not set")
    pool = _cap(_folder_images(Path(cfg.train_dir), "data.train_dir", cfg.crop), cfg.max_images)
    if cfg.test_dir:
        test_dirs = [cfg.test_dir] if isinstance(cfg.test_dir, str) else list(cfg.test_dir)
        test = []
        for test_dir in test_dirs:
            images = _folder_images(Path(test_dir), "data.test_dir", cfg.crop)
            if len(test_dirs) > 1:  # ids stay unique across sets: "CSet5/baby"
                images = [SourceImage(f"{Path(test_dir).name}/{i.id}", i.load) for i in images]
            test += images
        test = _cap(test, cfg.max_images)
    else:
        pool, test = split_pool(pool, cfg.test_fraction, seed)
    train, val = split_pool(pool, cfg.val_fraction, seed)
    return {"train": train, "val": val, "test": test}


@SOURCES.register("div2k")
def _div2k(cfg: DataConfig, seed: int) -> SourcePools:
    from featinv.download import fetch_div2k

    train_hr, valid_hr = fetch_div2k(Path(cfg.root), base_url=cfg.base_url)
    pool = _cap([_file_image(p, cfg.crop) for p in train_hr], cfg.max_images)
    test = _cap([_file_image(p, cfg.crop) for p in valid_hr], cfg.max_images)
    train, val = split_pool(pool, cfg.val_fraction, seed)
    return {"train": train, "val": val, "test": test}


# ------------------------------------------------------------------------------------ helpers


def _folder_images(folder: Path, param: str, min_side: int) -> list[SourceImage]:
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: directory not found (param `{param}`)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if is_image_path(p)]
    skipped = [p.name for p in files if not is_image_path(p)]
    if skipped:
        log.warning("%s: skipping %d non-image file(s): %s", folder, len(skipped), ", ".join(skipped[:5]))
    if not images:
        raise DataSourceError(
            f"{folder}: no image files found (param `{param}`); "
            f"expected files ending in .png, .jpg, .jpeg, .bmp, .tif, .webp"
        )
    return [_file_image(p, min_side, root=folder) for p in images]


def _file_image(path: Path, min_side: int, root: Path | None = None) -> SourceImage:
    image_id = path.relative_to(root).with_suffix("").as_posix() if root else path.stem
    return SourceImage(image_id, lambda: read_rgb(path, min_side=min_side))


def _constant(rgb: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: rgb


def _cap(images: list[SourceImage], limit: int | None) -> list[SourceImage]:
    return images if limit is None else images[:limit]


def _tile_grid(shape: tuple[int, int], count: int) -> list[tuple[int, int, int]]:
    """``count`` non-overlapping square tiles (top, left, side) covering a photo evenly."""
    height, width = shape
    best: tuple[int, int, int] | None = None
    for rows in range(1, count + 1):
        if count % rows:
            continue
        cols = count // rows
        side = min(height // rows, width // cols)
        if best is None or side > best[2]:
            best = (rows, cols, side)
    rows, cols, side = best
    # Centre the grid; tiles are disjoint, so no pixel appears in two splits.
    top0, left0 = (height - rows * side) // 2, (width - cols * side) // 2
    return [(top0 + r * side, left0 + c * side, side) for r in range(rows) for c in range(cols)]
