"""Reading whatever images users have, and the study's preprocessing."""

import numpy as np
import pytest
from PIL import Image

from featinv.errors import BadImageError
from featinv.images import center_crop, preprocess_eval, random_view, read_rgb, resize_square, view_rng

from conftest import photo, write_image


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_every_mode_becomes_rgb_uint8(tmp_path, mode):
    rgb = photo(240)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
    else:
        img = img.convert(mode)
    suffix = ".tif" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    out = read_rgb(path, min_side=224)
    assert out.shape == (240, 240, 3) and out.dtype == np.uint8
    if mode == "I;16":  # the 16-bit range is rescaled, not clipped to white
        assert 20 < out.mean() < 235


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((230, 230, 4), dtype=np.uint8)
    path = write_image(tmp_path / "clear.png", rgba, mode="RGBA")
    assert (read_rgb(path) == 255).all()


def test_non_image_and_corrupt_files_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(BadImageError, match="notes.png.*not an image"):
        read_rgb(text)
    good = write_image(tmp_path / "good.png", photo(240))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(BadImageError, match="truncated.png"):
        read_rgb(truncated)
    with pytest.raises(BadImageError, match="not found"):
        read_rgb(tmp_path / "missing.png")


def test_too_small_image_is_rejected(tmp_path):
    path = write_image(tmp_path / "tiny.png", photo(100))
    with pytest.raises(BadImageError, match="100×100.*224"):
        read_rgb(path, min_side=224)


def test_preprocessing_shapes_and_determinism():
    rgb = photo(500)
    resized = resize_square(rgb, 256)
    assert resized.shape == (256, 256, 3)
    assert center_crop(resized, 224).shape == (224, 224, 3)
    assert preprocess_eval(rgb).shape == (224, 224, 3)
    a = random_view(resized, 224, view_rng(42, "img", 0))
    b = random_view(resized, 224, view_rng(42, "img", 0))
    c = random_view(resized, 224, view_rng(42, "img", 1))
    assert np.array_equal(a, b) and a.shape == (224, 224, 3)
    assert not np.array_equal(a, c)
