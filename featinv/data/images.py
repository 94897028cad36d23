"""Reading images from disk into RGB uint8 arrays, and the study's preprocessing.

Whatever a user's folder holds — grayscale, palette, CMYK, RGBA, 16-bit, EXIF
rotated — becomes an (H, W, 3) uint8 RGB array; what cannot be read raises
:class:`BadImageError` naming the file and the problem.

Preprocessing is the published study's: resize the whole image to 256×256
(bicubic), then a centre crop of 224 (val/test) or a random crop of 224 with a
horizontal flip at p=0.5 (train).

Because every image is resized to ``data.resize``² before cropping, the only
size limit is :data:`MIN_SIDE` (32 pixels on the shorter side): anything
smaller is an icon, and resizing it to 256² would be almost pure
interpolation.  Images between that and ``data.resize`` (for training views,
``data.resize`` × ``data.train_scale``'s upper bound) are upsampled, which
:func:`featinv.data.image_store.prepare_images` counts and reports once.
"""

from __future__ import annotations

import itertools
import os
import re
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featinv.errors import BadImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SIDE",
    "display_path",
    "is_image_path",
    "read_rgb",
    "to_rgb_uint8",
    "resize_square",
    "center_crop",
    "training_view",
    "QUARTER_TURNS",
    "random_view",
    "preprocess_eval",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})

# Shorter side, in pixels, below which a source image is refused.  Not the crop
# size: images are resized to data.resize² (aspect not kept) before cropping, so
# a 200×300 photo is fine; but below 32 pixels an image is an icon and the
# resized version would be nearly all interpolation.
MIN_SIDE = 32

_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


def is_image_path(path: Path) -> bool:
    """Whether ``path`` has an image file suffix featinv reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def display_path(path: str | Path) -> str:
    """``path`` printable as UTF-8: undecodable filename bytes shown as ``\\xe9``.

    Python keeps such bytes as lone surrogates, which crash a UTF-8 terminal or log file.
    """
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def read_rgb(path: str | Path, min_side: int = 0) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Args:
        path: the image file.
        min_side: reject images whose shorter side is below this many pixels
            (sources pass :data:`MIN_SIDE`; 0 accepts any size).

    Raises:
        BadImageError: the file is missing, unreadable (permissions), not an
            image, truncated/corrupt, too large for PIL (decompression-bomb
            guard) or too small.
    """
    path = Path(path)
    shown = display_path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here and not later
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb_uint8(img)
    except FileNotFoundError:
        raise BadImageError(f"{shown}: file not found") from None
    except PermissionError:
        raise BadImageError(f"{shown}: permission denied; check the file's permissions") from None
    except Image.DecompressionBombError as exc:
        # PIL refuses before decoding; the header's pixel count is only in its message.
        found = _BOMB_PIXELS_RE.search(str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise BadImageError(
            f"{shown}: image header claims {pixels}, over PIL's decompression-bomb limit of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} (2 × PIL.Image.MAX_IMAGE_PIXELS); "
            "too large to be a study image (all are resized to data.resize²): downscale it or remove it"
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(f"{shown}: not an image file (or an unsupported format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{shown}: cannot decode image ({exc}); is the file corrupt?") from None
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise BadImageError(
            f"{shown}: image is {width}×{height}, shorter side below the {min_side}-pixel minimum "
            "(smaller images are icons: resizing them to data.resize² is pure interpolation); "
            "remove it or use larger images"
        )
    return rgb


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert any PIL image (L, LA, P, CMYK, RGBA, I;16, I, F) to (H, W, 3) uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grayscale: rescale the full range instead of clipping at 255.
        values = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite onto white: transparent areas carry no colour of their own.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole image to ``size``×``size`` with bicubic interpolation (aspect not kept)."""
    img = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def center_crop(rgb: np.ndarray, crop: int) -> np.ndarray:
    """The central ``crop``×``crop`` window."""
    height, width = rgb.shape[:2]
    top, left = (height - crop) // 2, (width - crop) // 2
    return rgb[top : top + crop, left : left + crop]


# The orientations a training view may take (``data.train_orientations``), as the number of
# quarter turns drawn from: "horizontal" is the published protocol (an h-flip with p = 0.5, no
# turn); "dihedral" also turns the view by k·90°, k uniform in 0..3 — the 8 symmetries of the square.
QUARTER_TURNS = {"horizontal": 1, "dihedral": 4}


def random_view(rgb: np.ndarray, crop: int, rng: np.random.Generator, orientations: str = "horizontal") -> np.ndarray:
    """A random ``crop``×``crop`` window, horizontally flipped with probability 0.5 and, for
    ``orientations="dihedral"``, turned by a random multiple of 90° (a further draw, made only then,
    so horizontal views are the ones featinv has always made)."""
    height, width = rgb.shape[:2]
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    view = rgb[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    if QUARTER_TURNS[orientations] > 1:
        view = np.rot90(view, int(rng.integers(0, QUARTER_TURNS[orientations])))
    return np.ascontiguousarray(view)


# The channel orders a training view may take (``data.train_channel_orders``), as the probability
# that a view gets another order than R, G, B: "rgb" is the published protocol; "shuffled" gives
# half the views one of the 5 other orders, uniformly. A shallow tap's decoder maps each window's
# colours back, and a training set of photographs shows it few of the colours a test set of
# drawings and portraits holds: on trained VGG-16 the shuffled views raised CSet14 + CSet5 by
# 0.14 dB on block1 (0.17 in the probe), most on skin and red, and by 0.48 dB on block2
# (BENCHMARKS.md, "Trained encoders"). Half, not all: on block1, giving every view a uniformly
# drawn order (R, G, B 1 in 6) scored 0.06 dB lower.
CHANNEL_SHUFFLE_PROBABILITY = {"rgb": 0.0, "shuffled": 0.5}
OTHER_CHANNEL_ORDERS = tuple(itertools.permutations(range(3)))[1:]  # all but R, G, B itself


def reordered_channels(view: np.ndarray, rng: np.random.Generator, channel_orders: str = "rgb") -> np.ndarray:
    """``view`` with its channels in another order with :data:`CHANNEL_SHUFFLE_PROBABILITY`'s
    probability (draws are made only when that is above 0, so "rgb" views are the ones featinv
    has always made)."""
    p = CHANNEL_SHUFFLE_PROBABILITY[channel_orders]
    if p > 0 and rng.random() < p:
        order = OTHER_CHANNEL_ORDERS[int(rng.integers(0, len(OTHER_CHANNEL_ORDERS)))]
        view = np.ascontiguousarray(view[..., list(order)])
    return view


def training_view(rgb: np.ndarray, resize: int, crop: int, scale: tuple[float, float],
                  rng: np.random.Generator, resized: np.ndarray | None = None,
                  orientations: str = "horizontal", channel_orders: str = "rgb") -> np.ndarray:
    """One augmented training view: the image resized to (``resize``·s)², :func:`random_view`,
    then :func:`reordered_channels`.

    ``s`` is drawn uniformly from ``scale`` = (low, high); at (1, 1), the published protocol, no
    draw is made, so such views are the ones featinv has always made.  ``resized``: the image
    already resized to ``resize``², reused when s = 1.  ``orientations``: see :data:`QUARTER_TURNS`;
    ``channel_orders``: see :data:`CHANNEL_SHUFFLE_PROBABILITY`.
    """
    low, high = scale
    size = round(resize * (low if low == high else float(rng.uniform(low, high))))
    base = resized if resized is not None and size == resize else resize_square(rgb, size)
    return reordered_channels(random_view(base, crop, rng, orientations), rng, channel_orders)


def preprocess_eval(rgb: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The study's evaluation preprocessing: bicubic resize to ``resize``², centre crop."""
    return center_crop(resize_square(rgb, resize), crop)


def view_rng(seed: int, image_id: str, view: int) -> np.random.Generator:
    """A generator for one augmented view, stable under adding/removing other images."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode()), view])
