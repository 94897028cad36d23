"""Reading images from disk into RGB uint8 arrays, and the study's preprocessing.

Whatever a user's folder holds — grayscale, palette, CMYK, RGBA, 16-bit, EXIF
rotated — becomes an (H, W, 3) uint8 RGB array; what cannot be read raises
:class:`BadImageError` naming the file and the problem.

Preprocessing is the published study's: resize the whole image to 256×256
(bicubic), then a centre crop of 224 (val/test) or a random crop of 224 with a
horizontal flip at p=0.5 (train).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featinv.errors import BadImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "is_image_path",
    "read_rgb",
    "to_rgb_uint8",
    "resize_square",
    "center_crop",
    "random_view",
    "preprocess_eval",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"})


def is_image_path(path: Path) -> bool:
    """Whether ``path`` has an image file suffix featinv reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_rgb(path: str | Path, min_side: int = 0) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Args:
        path: the image file.
        min_side: reject images whose shorter side is below this many pixels.

    Raises:
        BadImageError: the file is missing, not an image, truncated/corrupt, or too small.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here and not later
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb_uint8(img)
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file (or an unsupported format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{path}: cannot decode image ({exc}); is the file corrupt?") from None
    height, width = rgb.shape[:2]
    if min(height, width) < min_side:
        raise BadImageError(
            f"{path}: image is {width}×{height}, smaller than the {min_side}-pixel crop; "
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


def random_view(rgb: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``crop``×``crop`` window, horizontally flipped with probability 0.5."""
    height, width = rgb.shape[:2]
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    view = rgb[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def preprocess_eval(rgb: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The study's evaluation preprocessing: bicubic resize to ``resize``², centre crop."""
    return center_crop(resize_square(rgb, resize), crop)


def view_rng(seed: int, image_id: str, view: int) -> np.random.Generator:
    """A generator for one augmented view, stable under adding/removing other images."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode()), view])
