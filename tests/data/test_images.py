"""Reading whatever images users have, and the study's preprocessing."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from featinv.errors import BadImageError
from featinv.data.images import (
    MIN_SIDE,
    OTHER_CHANNEL_ORDERS,
    center_crop,
    display_path,
    preprocess_eval,
    random_view,
    read_rgb,
    resize_square,
    training_view,
    view_rng,
)

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
    icon = write_image(tmp_path / "icon.png", photo(MIN_SIDE - 1))
    with pytest.raises(BadImageError, match=f"icon.png.*{MIN_SIDE}-pixel minimum"):
        read_rgb(icon, min_side=MIN_SIDE)


def test_exif_rotated_photo_smaller_than_the_crop_is_accepted(tmp_path):
    # Stored 300×200, EXIF says rotate: 200×300 upright; resized to 256² before any crop.
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(photo(300)[:200]).save(path, exif=exif)
    rgb = read_rgb(path, min_side=MIN_SIDE)
    assert rgb.shape == (300, 200, 3)
    assert preprocess_eval(rgb).shape == (224, 224, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming ``width``×``height`` (no pixel data: it need not decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_is_one_line_naming_file_and_pixels(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(50_000, 50_000))
    with pytest.raises(BadImageError, match=r"huge.png.*2,500,000,000 pixels.*too large") as info:
        read_rgb(path)
    assert "\n" not in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)


def test_permission_denied_is_not_called_corrupt(tmp_path, monkeypatch):
    path = write_image(tmp_path / "locked.png", photo(64))

    def denied(fp, *args, **kwargs):  # chmod cannot lock root out, so deny at the open
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(BadImageError, match="locked.png: permission denied; check the file's permissions") as info:
        read_rgb(path)
    assert "corrupt" not in str(info.value)


def test_undecodable_file_name_is_shown_escaped(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    path = os.fsdecode(raw)
    open(raw, "wb").close()
    with pytest.raises(BadImageError) as info:
        read_rgb(path)
    message = str(info.value)
    message.encode("utf-8")  # printable on a UTF-8 terminal
    assert "caf\\xe9.png" in message
    assert display_path(path).endswith("caf\\xe9.png")


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


def test_training_views_at_scale_one_are_the_published_views():
    rgb = photo(500)
    resized = resize_square(rgb, 256)
    for v in range(3):
        published = random_view(resized, 224, view_rng(42, "img", v))
        assert np.array_equal(training_view(rgb, 256, 224, (1.0, 1.0), view_rng(42, "img", v)), published)
        assert np.array_equal(training_view(rgb, 256, 224, (1.0, 1.0), view_rng(42, "img", v), resized), published)


def test_scaled_training_views_are_seeded_crops_of_the_image_resized_by_their_scale():
    rgb = photo(500)
    views = [training_view(rgb, 256, 224, (1.0, 2.0), view_rng(42, "img", v)) for v in range(6)]
    again = [training_view(rgb, 256, 224, (1.0, 2.0), view_rng(42, "img", v)) for v in range(6)]
    assert all(np.array_equal(a, b) and a.shape == (224, 224, 3) for a, b in zip(views, again))
    # Each view is a window of the image resized to (256·s)², s drawn from the view's own generator.
    for v, view in enumerate(views):
        rng = view_rng(42, "img", v)
        size = round(256 * rng.uniform(1.0, 2.0))
        assert np.array_equal(view, random_view(resize_square(rgb, size), 224, rng))
    # A fixed scale is no draw: 1.5 resizes every view to 384².
    rng = view_rng(42, "img", 0)
    assert np.array_equal(training_view(rgb, 256, 224, (1.5, 1.5), view_rng(42, "img", 0)),
                          random_view(resize_square(rgb, 384), 224, rng))


def test_dihedral_views_are_the_horizontal_view_turned_by_a_seeded_quarter_turn():
    resized = resize_square(photo(500), 256)
    turns = set()
    for v in range(24):
        rng = view_rng(42, "img", v)
        horizontal = random_view(resized, 224, rng)  # the same crop and flip draws come first
        k = int(rng.integers(0, 4))
        turns.add(k)
        dihedral = random_view(resized, 224, view_rng(42, "img", v), "dihedral")
        assert np.array_equal(dihedral, np.rot90(horizontal, k)) and dihedral.flags["C_CONTIGUOUS"]
        assert np.array_equal(dihedral, random_view(resized, 224, view_rng(42, "img", v), "dihedral"))
    assert turns == {0, 1, 2, 3}
    # Horizontal views draw nothing more: the published views are unchanged.
    assert np.array_equal(random_view(resized, 224, view_rng(42, "img", 0), "horizontal"),
                          random_view(resized, 224, view_rng(42, "img", 0)))


def test_shuffled_views_are_the_published_view_with_half_of_them_in_another_channel_order():
    rgb = photo(500)
    resized = resize_square(rgb, 256)
    orders = []
    for v in range(64):
        published = training_view(rgb, 256, 224, (1.0, 1.0), view_rng(42, "img", v), resized)
        shuffled = training_view(rgb, 256, 224, (1.0, 1.0), view_rng(42, "img", v), resized, channel_orders="shuffled")
        assert np.array_equal(shuffled, training_view(rgb, 256, 224, (1.0, 1.0), view_rng(42, "img", v), resized,
                                                      channel_orders="shuffled"))  # seeded
        # The same crop and flip (drawn first), its channels in one of the 6 orders.
        order = next(o for o in [(0, 1, 2), *OTHER_CHANNEL_ORDERS] if np.array_equal(shuffled, published[..., list(o)]))
        orders.append(order)
        assert shuffled.flags["C_CONTIGUOUS"]
    assert set(orders) == {(0, 1, 2), *OTHER_CHANNEL_ORDERS}  # every order occurs
    assert 16 <= orders.count((0, 1, 2)) <= 48  # about half keep R, G, B
