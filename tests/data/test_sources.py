"""Image sources: the offline sample, folders (and their bad inputs), seeded splits, ids."""

import json
import os

import numpy as np
import pytest

from featinv.config import DataConfig
from featinv.errors import BadImageError, DataSourceError, ParamsError, UnknownNameError
from featinv.data.image_store import ImageStore, prepare_images
from featinv.data.images import view_rng
from featinv.data.sources import _assign_ids, _file_images, _fold, _folder_images, _tile_grid, collect_images, split_pool

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
    from featinv.data.image_store import ImageStore

    store = ImageStore(tiny_images)
    assert store.count("train") == 12 and store.count("val") == 2 and store.count("test") == 2
    pixels = store.pixels("train")
    assert pixels.dtype == np.uint8 and pixels.shape[1:] == (224, 224, 3)
    assert store.ids("train")[0].endswith("#v0") and store.ids("train")[1].endswith("#v1")
    assert not np.array_equal(pixels[0], pixels[1])  # two different augmented views


def _folder_ids(folder) -> list[str]:
    return [image.id for image in _file_images(_folder_images(folder, "data.train_dir"), folder)]


def test_broken_symlink_is_an_error_naming_link_and_target(tmp_path):
    write_image(tmp_path / "train" / "a.png", photo(40))
    os.symlink("gone/missing.png", tmp_path / "train" / "x.png")
    with pytest.raises(DataSourceError, match=r"x.png: broken symbolic link to 'gone/missing.png'"):
        collect_images(DataConfig(source="folder", train_dir=str(tmp_path / "train")), 42)


def test_pipe_with_an_image_name_is_an_error_not_a_hang(tmp_path):
    write_image(tmp_path / "train" / "a.png", photo(40))
    os.mkfifo(tmp_path / "train" / "pipe.png")
    with pytest.raises(DataSourceError, match="pipe.png: not a regular file"):
        collect_images(DataConfig(source="folder", train_dir=str(tmp_path / "train")), 42)


def test_unreadable_subfolder_is_named_not_skipped(tmp_path, monkeypatch):
    write_image(tmp_path / "train" / "a.png", photo(40))
    write_image(tmp_path / "train" / "locked" / "b.png", photo(40))
    real_scandir = os.scandir

    def scandir(path="."):  # chmod cannot lock root out, so deny at the listing
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataSourceError, match=r"locked: cannot list this directory \(Permission denied"):
        collect_images(DataConfig(source="folder", train_dir=str(tmp_path / "train")), 42)


def test_ordinary_ids_are_the_relative_path_without_suffix(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.tif", "100%.png", "café.png"):
        write_image(tmp_path / name, photo(40))
    assert _folder_ids(tmp_path) == ["100%", "a", "b", "café", "sub/c"]


def test_ids_that_would_clash_keep_their_suffix_or_gain_a_hash(tmp_path):
    for name in ("copy.PNG", "copy.png", "copy.jpg", "other.png", "Other.bmp"):
        write_image(tmp_path / name, photo(40), format="PNG")
    ids = _folder_ids(tmp_path)
    assert len({_fold(i) for i in ids}) == 5  # distinct even on a case-insensitive filesystem
    assert "copy.jpg" in ids and "other.png" in ids and "Other.bmp" in ids
    assert sorted(i for i in ids if i.startswith("copy.") and "~" in i)[0].startswith("copy.PNG~")
    assert _folder_ids(tmp_path) == ids  # stable


def test_assign_ids_is_unique_for_adversarial_names():
    rels = ["x.png", "x.jpg", "x.png.tif", "X.PNG", "caf%E9.png", os.fsdecode(b"caf\xe9.png"), "e\u0301.png", "\u00e9.png"]
    ids = _assign_ids(rels)
    assert len({_fold(i) for i in ids}) == len(rels)
    for image_id in ids:
        image_id.encode("utf-8")
    assert _assign_ids(["a.png", "b.png", "sub/c.png"]) == ["a", "b", "sub/c"]


def test_undecodable_file_name_gets_an_escaped_utf8_id_and_prepares(tmp_path):
    folder = tmp_path / "train"
    for i in range(3):
        write_image(folder / f"{i}.png", photo(40, seed=i))
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as fh:
        fh.write((folder / "0.png").read_bytes())
    assert "caf%E9" in _folder_ids(folder)
    view_rng(42, "caf%E9", 0)  # ids seed augmentation via .encode()

    cfg = DataConfig(source="folder", train_dir=str(folder), resize=40, crop=32, train_views=1)
    out = tmp_path / "images.zarr"
    prepare_images(cfg, 42, out, workers=1)
    json.dumps(ImageStore(out).attrs["ids"], ensure_ascii=False).encode("utf-8")
