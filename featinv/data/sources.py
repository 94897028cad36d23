"""Image sources, keyed by the ``data.source`` param: where the study's images come from.

A source yields three pools of :class:`SourceImage` (train / val / test), each
image a stable id plus a loader returning (H, W, 3) uint8 RGB.  Splits are
seeded and reproducible:

- ``sample`` — real photographs shipped inside the scikit-image wheel (no
  network), each cut into non-overlapping square tiles so train and test never
  share pixels.
- ``folder`` — any directory of images (``data.train_dir``, optional ``data.test_dir``).
  An image's id is its path relative to the folder without the suffix
  (``sub/0001``).  Ids are valid UTF-8 (undecodable filename bytes are
  percent-escaped, ``caf%E9``) and distinct even case-insensitively: files whose
  ids would clash (``copy.png`` / ``copy.jpg``) keep their suffix, and if that
  still clashes (``copy.PNG`` / ``copy.png``) a hash of the raw name is appended.
- ``div2k`` — the official DIV2K archives: 640 train / 160 val from
  DIV2K_train_HR (seed 42), the 100 DIV2K_valid_HR images as test.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from featinv.config import DataConfig
from featinv.errors import DataSourceError, ParamsError
from featinv.data.images import MIN_SIDE, display_path, is_image_path, read_rgb
from featinv.registry import Registry

__all__ = ["SourceImage", "SourcePools", "SOURCES", "collect_images", "folder_pool", "split_pool", "SAMPLE_PHOTOS"]

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
    train_dir = Path(cfg.train_dir)
    pool = _cap(_file_images(_folder_images(train_dir, "data.train_dir"), train_dir), cfg.max_images)
    if cfg.test_dir:
        test_dirs = [Path(cfg.test_dir)] if isinstance(cfg.test_dir, str) else [Path(d) for d in cfg.test_dir]
        if len(test_dirs) == 1:
            test = _file_images(_folder_images(test_dirs[0], "data.test_dir"), test_dirs[0])
        else:  # ids stay unique across sets: "CSet5/baby"
            files = {}
            for test_dir in test_dirs:
                for path in _folder_images(test_dir, "data.test_dir"):
                    rel = f"{test_dir.name}/{path.relative_to(test_dir).as_posix()}"
                    if rel in files:
                        raise DataSourceError(
                            f"data.test_dir: {display_path(files[rel])} and {display_path(path)} "
                            f"would both be {display_path(rel)!r} (test ids are '<folder name>/<file>'); "
                            "rename one of the folders"
                        )
                    files[rel] = path
            test = [_file_image(path, i) for path, i in zip(files.values(), _assign_ids(list(files)))]
        test = _cap(test, cfg.max_images)
    else:
        pool, test = split_pool(pool, cfg.test_fraction, seed)
    train, val = split_pool(pool, cfg.val_fraction, seed)
    return {"train": train, "val": val, "test": test}


@SOURCES.register("div2k")
def _div2k(cfg: DataConfig, seed: int) -> SourcePools:
    from featinv.data.download import fetch_div2k

    train_hr, valid_hr = fetch_div2k(Path(cfg.root), base_url=cfg.base_url)
    pool = _cap(_file_images(train_hr), cfg.max_images)
    test = _cap(_file_images(valid_hr), cfg.max_images)
    train, val = split_pool(pool, cfg.val_fraction, seed)
    return {"train": train, "val": val, "test": test}


# ------------------------------------------------------------------------------------ helpers


def _folder_images(folder: Path, param: str) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted); anything unusable raises.

    ``os.walk`` rather than ``Path.rglob``: rglob silently skips directories it
    may not read, and ``is_file()`` silently drops broken links.  Like rglob, it
    does not descend into symlinked directories.
    """
    if not folder.is_dir():
        raise DataSourceError(f"{display_path(folder)}: directory not found (param `{param}`)")

    def unreadable(exc: OSError) -> None:
        where = display_path(exc.filename if exc.filename is not None else folder)
        raise DataSourceError(
            f"{where}: cannot list this directory ({exc.strerror or exc}; param `{param}`); "
            f"make it readable (chmod a+rx) or move it out of {display_path(folder)}"
        )

    found: list[Path] = []
    for dirpath, _dirnames, names in os.walk(folder, onerror=unreadable):
        found += [Path(dirpath) / name for name in names if not name.startswith(".")]
    images, skipped = [], []
    for path in sorted(found):
        if not is_image_path(path):
            skipped.append(display_path(path.name))
        elif _is_regular_file(path, param):
            images.append(path)
    if skipped:
        log.warning(
            "%s: skipping %d non-image file(s): %s", display_path(folder), len(skipped), ", ".join(skipped[:5])
        )
    if not images:
        raise DataSourceError(
            f"{display_path(folder)}: no image files found (param `{param}`); "
            f"expected files ending in .png, .jpg, .jpeg, .bmp, .tif, .webp"
        )
    return images


def _is_regular_file(path: Path, param: str) -> bool:
    """True for a (link to a) regular file; a broken link or a pipe/socket raises, never vanishes."""
    try:
        if path.is_file():
            return True
        if path.is_symlink():  # is_file() is False: the target is missing or the link loops
            raise DataSourceError(
                f"{display_path(path)}: broken symbolic link to {display_path(os.readlink(path))!r} "
                f"(target missing or a link loop; param `{param}`); fix the link or remove it"
            )
    except OSError as exc:  # e.g. a directory with read but no search (x) permission
        raise DataSourceError(
            f"{display_path(path)}: cannot read file information ({exc.strerror or exc}; param `{param}`); "
            "check the permissions of the file and its folder"
        ) from None
    raise DataSourceError(
        f"{display_path(path)}: not a regular file (a pipe, socket or device; param `{param}`); "
        "remove it or move it out of the folder"
    )


def folder_pool(folder: str | Path, param: str) -> list[SourceImage]:
    """Every image under ``folder``, with the ids the folder source gives them.

    Raises:
        DataSourceError: the folder is missing, unreadable or holds no images (naming ``param``).
    """
    folder = Path(folder)
    return _file_images(_folder_images(folder, param), folder)


def _file_images(paths: Sequence[Path], root: Path | None = None) -> list[SourceImage]:
    """Images with ids from their paths relative to ``root`` (the bare names when None)."""
    rels = [path.relative_to(root).as_posix() if root else path.name for path in paths]
    return [_file_image(path, image_id) for path, image_id in zip(paths, _assign_ids(rels))]


def _file_image(path: Path, image_id: str) -> SourceImage:
    return SourceImage(image_id, lambda: read_rgb(path, min_side=MIN_SIDE))


def _assign_ids(rels: Sequence[str]) -> list[str]:
    """Ids for distinct relative paths: valid UTF-8, unique even case-insensitively, stable.

    Each path starts at tier 0 (no suffix, the id ordinary names always had, so
    the augmentation seeds ``view_rng(seed, id, view)`` do not move).  Every
    member of a group whose ids clash (compared casefolded and NFC-normalised,
    as case-insensitive or macOS filesystems would) moves up a tier: 1 keeps
    the suffix, 2 appends a hash of the raw name bytes, which only a hash
    collision could clash.  Ids depend on the folder's names only, so a re-run
    gets the same ones.
    """

    def candidate(rel: str, tier: int) -> str:
        if tier == 0:
            return _utf8_id(PurePosixPath(rel).with_suffix("").as_posix())
        if tier == 1:
            return _utf8_id(rel)
        return f"{_utf8_id(rel)}~{hashlib.sha256(os.fsencode(rel)).hexdigest()[:8]}"

    tiers = [0] * len(rels)
    while True:
        ids = [candidate(rel, tier) for rel, tier in zip(rels, tiers)]
        groups = collections.defaultdict(list)
        for k, image_id in enumerate(ids):
            groups[_fold(image_id)].append(k)
        clashing = [k for group in groups.values() if len(group) > 1 for k in group if tiers[k] < 2]
        if not clashing:
            break
        for k in clashing:
            tiers[k] += 1
    assert len(groups) == len(ids), f"ids still clash after disambiguation: {sorted(ids)}"
    return ids


def _utf8_id(text: str) -> str:
    """``text`` if it is valid UTF-8; else its undecodable bytes percent-escaped (``caf%E9``).

    Python holds such bytes as lone surrogates, which cannot be written to CSV/JSON
    or hashed by ``view_rng``.  In an escaped id a literal ``%`` becomes ``%25``,
    so the escaping is reversible; names that need none keep their id.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    decoded = os.fsencode(text).decode("utf-8", errors="surrogateescape")
    out = []
    for char in decoded:
        if "\udc80" <= char <= "\udcff":
            out.append(f"%{ord(char) - 0xDC00:02X}")
        elif char == "%":
            out.append("%25")
        else:
            out.append(char)
    return "".join(out)


def _fold(image_id: str) -> str:
    """The form two ids share if a case-insensitive, normalising filesystem would confuse them."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", image_id).casefold())


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
