"""Image sources: the offline sample, folders (and their bad inputs), seeded splits."""

import numpy as np
import pytest

from featinv.config import DataConfig
from featinv.errors import BadImageError, DataSourceError, ParamsError, UnknownNameError
from featinv.image_store import prepare_images
from featinv.sources import _tile_grid, collect_images, split_pool

from conftest import photo, write_image


def test_sample_source_has_40_to_60_real_photos_split_three_ways():
    pools = collect_images(DataConfig(), seed=42)
    sizes = {k: len(v) for k, v in pools.items()}
    assert 40 <= sum(sizes.values()) <= 60 and min(sizes.values()) > 0
    ids = [i.id for pool in pools.values() for i in pool]
    assert len(ids) == len(set(ids))
    image = pools["test"][0].load()
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 10  # a photograph, not a flat fill


def test_sample_tiles_never_overlap():
    tiles = _tile_grid((300, 451), 6)
    boxes = {(t, l, t + s, l + s) for t, l, s in tiles}
    assert len(boxes) == 6
    for a in boxes:
        for b in boxes - {a}:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_split_is_seeded_and_sized():
    items = list(range(800))
    rest, val = split_pool(items, 0.2, seed=42)
    assert len(val) == 160 and len(rest) == 640 and not set(rest) & set(val)
    assert split_pool(items, 0.2, seed=42) == (rest, val)
    assert split_pool(items, 0.2, seed=7)[1] != val


def test_folder_source_with_separate_test_dir(tmp_path):
    for i in range(5):
        write_image(tmp_path / "train" / f"{i}.png", photo(240, seed=i))
    (tmp_path / "train" / "README.txt").write_text("notes")  # skipped with a warning
    write_image(tmp_path / "test" / "t.jpg", photo(240, seed=9))
    cfg = DataConfig(source="folder", train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"))
    pools = collect_images(cfg, seed=42)
    assert [len(pools[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert pools["test"][0].id == "t"


def test_empty_and_missing_folders_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no image files"):
        collect_images(DataConfig(source="folder", train_dir=str(tmp_path / "empty")), 42)
    with pytest.raises(DataSourceError, match="not found"):
        collect_images(DataConfig(source="folder", train_dir=str(tmp_path / "nope")), 42)
    with pytest.raises(ParamsError, match="data.train_dir"):
        collect_images(DataConfig(source="folder"), 42)
    with pytest.raises(UnknownNameError, match="sample, folder, div2k"):
        collect_images(DataConfig(source="flickr"), 42)


def test_a_bad_image_fails_prepare_and_leaves_no_store(tmp_path):
    for i in range(6):
        write_image(tmp_path / "train" / f"{i}.png", photo(240, seed=i))
    (tmp_path / "train" / "3.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "images.zarr"
    cfg = DataConfig(source="folder", train_dir=str(tmp_path / "train"))
    with pytest.raises(BadImageError, match="3.png"):
        prepare_images(cfg, 42, out)
    assert not out.exists() and not (tmp_path / "images.zarr.partial").exists()


def test_prepared_store_holds_uint8_views_and_ids(tiny_images):
    from featinv.image_store import ImageStore

    store = ImageStore(tiny_images)
    assert store.count("train") == 12 and store.count("val") == 2 and store.count("test") == 2
    pixels = store.pixels("train")
    assert pixels.dtype == np.uint8 and pixels.shape[1:] == (224, 224, 3)
    assert store.ids("train")[0].endswith("#v0") and store.ids("train")[1].endswith("#v1")
    assert not np.array_equal(pixels[0], pixels[1])  # two different augmented views
