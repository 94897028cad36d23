"""Figures: original | reconstruction | |difference| heat-map rows with PSNR/SSIM captions.

One rendering for everything a user looks at — the evaluation grid, the
study's comparison figure and ``featinv reconstruct`` — so figures compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["comparison_rows", "side_by_side", "save_png", "heatmap"]

CAPTION_HEIGHT = 22
GAP = 4
BACKGROUND = (255, 255, 255)
# Differences of this size (in [0,1] pixel units, mean over RGB) saturate the heat map.
DIFF_SATURATION = 0.25


def heatmap(diff01_hw: np.ndarray, saturation: float = DIFF_SATURATION) -> np.ndarray:
    """|difference| (H, W) → (H, W, 3) uint8 using matplotlib's 'inferno' colour map."""
    from matplotlib import colormaps

    scaled = np.clip(diff01_hw / saturation, 0.0, 1.0)
    return (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)


def side_by_side(
    original01_hwc: np.ndarray,
    recon01_hwc: np.ndarray,
    caption: str = "",
    extra: Sequence[tuple[str, np.ndarray]] = (),
    recon_label: str = "reconstruction",
) -> Image.Image:
    """One row: original | reconstruction (| extra reconstructions) | |difference| heat map.

    Args:
        original01_hwc, recon01_hwc: float images in [0, 1].
        caption: text under the row (e.g. "PSNR 27.1 dB · SSIM 0.91").
        extra: further (label, image) panels placed after the reconstruction.
    """
    diff = np.abs(original01_hwc - recon01_hwc).mean(axis=2)
    panels = [("original", original01_hwc), (recon_label, recon01_hwc), *extra]
    tiles = [_to_uint8(img) for _, img in panels] + [heatmap(diff)]
    labels = [label for label, _ in panels] + ["|difference|"]
    height, width = tiles[0].shape[:2]
    canvas = Image.new("RGB", (len(tiles) * (width + GAP) - GAP, height + 2 * CAPTION_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = i * (width + GAP)
        draw.text((x + 4, 3), label, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(tile), (x, CAPTION_HEIGHT))
    draw.text((4, height + CAPTION_HEIGHT + 3), caption, fill=(0, 0, 0), font=font)
    return canvas


def comparison_rows(rows: Sequence[Image.Image], title: str = "") -> Image.Image:
    """Stack rows vertically under an optional title."""
    width = max(r.width for r in rows)
    top = CAPTION_HEIGHT if title else 0
    canvas = Image.new("RGB", (width, top + sum(r.height + GAP for r in rows)), BACKGROUND)
    if title:
        ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0), font=_font())
    y = top
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + GAP
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save atomically as PNG, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _to_uint8(img01: np.ndarray) -> np.ndarray:
    return (np.clip(img01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()
