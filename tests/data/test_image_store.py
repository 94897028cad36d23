"""prepare_images: test leakage and upsampling are reported; a full disk leaves nothing behind."""

import dataclasses
import errno
import itertools
import logging
import shutil

import numpy as np
import pytest
import zarr

from featinv.config import DataConfig
from featinv.errors import ParamsError, StorageError
from featinv.data.image_store import ImageStore, prepare_images

from conftest import photo, write_image

# Tiny images and crops keep each prepare well under a second.
SMALL = {"resize": 40, "crop": 32, "train_views": 2}


def _folders(tmp_path, n_train: int = 5, size: int = 48):
    for i in range(n_train):
        write_image(tmp_path / "train" / f"{i}.png", photo(size, seed=i))
    write_image(tmp_path / "test" / "fresh.png", photo(size, seed=99))
    return DataConfig(source="folder", train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), **SMALL)


def test_image_in_train_and_test_is_reported(tmp_path, caplog):
    cfg = _folders(tmp_path)
    shutil.copy(tmp_path / "train" / "2.png", tmp_path / "test" / "leak.png")
    out = tmp_path / "images.zarr"
    with caplog.at_level(logging.WARNING, logger="featinv.data.image_store"):
        prepare_images(cfg, 42, out, workers=2)
    leaks = [r.getMessage() for r in caplog.records if "test leakage" in r.getMessage()]
    assert len(leaks) == 1 and leaks[0].startswith("1 test image(s)") and "'leak'" in leaks[0] and "'2'" in leaks[0]
    (duplicate,) = ImageStore(out).attrs["duplicates_across_splits"]
    assert duplicate["test"] == "leak" and duplicate["id"] == "2" and duplicate["split"] in ("train", "val")


def test_distinct_images_are_not_reported_and_upsampling_is_counted_once(tmp_path, caplog):
    cfg = _folders(tmp_path, size=36)  # shorter side 36 < data.resize 40: upsampled
    out = tmp_path / "images.zarr"
    with caplog.at_level(logging.WARNING, logger="featinv.data.image_store"):
        prepare_images(cfg, 42, out, workers=2)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("test leakage" in m for m in messages)
    upsampled = [m for m in messages if "upsampled" in m]
    assert len(upsampled) == 1 and upsampled[0].startswith("6 of 6 source image(s)")
    store = ImageStore(out)
    assert store.attrs["duplicates_across_splits"] == []
    assert store.attrs["upsampled"]["test"] == ["fresh"]


def test_training_views_scaled_past_an_image_s_size_count_as_upsampled(tmp_path, caplog):
    # 48 px ≥ data.resize 40, so val/test crops are downsampled; training views reach 40 × 1.5 = 60 px
    cfg = dataclasses.replace(_folders(tmp_path, size=48), train_scale=(1.0, 1.5))
    out = tmp_path / "images.zarr"
    with caplog.at_level(logging.WARNING, logger="featinv.data.image_store"):
        prepare_images(cfg, 42, out, workers=2)
    (warning,) = [r.getMessage() for r in caplog.records if "upsampled" in r.getMessage()]
    store = ImageStore(out)
    assert store.attrs["upsampled"]["test"] == [] and len(store.attrs["upsampled"]["train"]) > 0
    flagged = sum(len(ids) for ids in store.attrs["upsampled"].values())
    assert warning.startswith(f"{flagged} of 6 source image(s)") and "data.train_scale[1] = 60×60" in warning


def test_disk_full_is_one_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    cfg = _folders(tmp_path, n_train=8)
    out = tmp_path / "images.zarr"
    real_setitem = zarr.Array.__setitem__
    writes = []

    def setitem(self, selection, value):  # the disk fills up after three chunks
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(selection)
        real_setitem(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    with pytest.raises(StorageError) as info:
        prepare_images(cfg, 42, out, workers=2)
    message = str(info.value)
    assert str(out) in message and "ENOSPC" in message and "free space on" in message and "--out" in message
    assert "\n" not in message
    assert not out.exists() and not (tmp_path / "images.zarr.partial").exists()


def test_permission_denied_names_the_fix(tmp_path, monkeypatch):
    cfg = _folders(tmp_path)
    out = tmp_path / "images.zarr"

    def denied(self, selection, value):
        raise PermissionError(errno.EACCES, "Permission denied", "c/0/0/0/0")

    monkeypatch.setattr(zarr.Array, "__setitem__", denied)
    with pytest.raises(StorageError, match=r"images.zarr: writing the image store failed \(EACCES: .*writable"):
        prepare_images(cfg, 42, out, workers=2)
    assert not out.exists() and not (tmp_path / "images.zarr.partial").exists()


def test_scale_and_turn_augmentation_are_recorded_and_the_published_views_keep_their_fingerprint(tmp_path):
    cfg = _folders(tmp_path)
    published = prepare_images(cfg, 42, tmp_path / "published.zarr", workers=2)
    again = prepare_images(dataclasses.replace(cfg, train_scale=(1.0, 1.0)), 42, tmp_path / "again.zarr", workers=2)
    scaled = prepare_images(dataclasses.replace(cfg, train_scale=(1.0, 1.5)), 42, tmp_path / "scaled.zarr", workers=2)
    turned = prepare_images(dataclasses.replace(cfg, train_orientations="dihedral"), 42, tmp_path / "turned.zarr",
                            workers=2)
    assert again.fingerprint == published.fingerprint
    assert len({published.fingerprint, scaled.fingerprint, turned.fingerprint}) == 3
    assert ImageStore(tmp_path / "published.zarr").attrs["preprocessing"]["train"] == "random crop 32 + hflip p=0.5, 2 views"
    scaled_store = ImageStore(tmp_path / "scaled.zarr")
    assert scaled_store.attrs["preprocessing"]["train"].endswith("each view resized to (40·s)², s ~ U[1, 1.5]")
    assert scaled_store.attrs["data"]["train_scale"] == [1.0, 1.5]
    turned_store = ImageStore(tmp_path / "turned.zarr")
    assert turned_store.attrs["preprocessing"]["train"] == ("random crop 32 + hflip p=0.5, 2 views, "
                                                           "each view turned by k·90°, k ~ U{0..3}")
    assert turned_store.attrs["data"]["train_orientations"] == "dihedral"
    # Evaluation crops do not depend on the training views' scale.
    published_store = ImageStore(tmp_path / "published.zarr")
    for split in ("val", "test"):
        assert (published_store.pixels(split)[:] == scaled_store.pixels(split)[:]).all()
        assert (published_store.pixels(split)[:] == turned_store.pixels(split)[:]).all()
    assert not (published_store.pixels("train")[:] == scaled_store.pixels("train")[:]).all()


def test_shuffled_channel_orders_are_recorded_and_change_only_training_views(tmp_path):
    cfg = _folders(tmp_path)
    published = prepare_images(cfg, 42, tmp_path / "published.zarr", workers=2)
    shuffled = prepare_images(dataclasses.replace(cfg, train_channel_orders="shuffled"), 42, tmp_path / "shuffled.zarr",
                              workers=2)
    assert shuffled.fingerprint != published.fingerprint
    store, before = ImageStore(tmp_path / "shuffled.zarr"), ImageStore(tmp_path / "published.zarr")
    assert store.attrs["preprocessing"]["train"] == ("random crop 32 + hflip p=0.5, 2 views, "
                                                     "channels put in one of the 5 other orders with p=0.5")
    assert store.attrs["data"]["train_channel_orders"] == "shuffled"
    for split in ("val", "test"):
        assert (store.pixels(split)[:] == before.pixels(split)[:]).all()
    # Each training view is the published one (same crop and flip), its channels reordered or not.
    new, old = store.pixels("train")[:], before.pixels("train")[:]
    assert all(any(np.array_equal(n, o[..., list(order)]) for order in itertools.permutations(range(3)))
               for n, o in zip(new, old))
    assert not (new == old).all()


@pytest.mark.parametrize("scale, message", [
    ((1.5,), "`data.train_scale` = [1.5] must be [low, high]"),
    ((1.5, 1.2), "must be [low, high] with 0 < low ≤ high"),
    ((0.5, 1.0), "`data.train_scale` low = 0.5 would resize to 20², below `data.crop` = 32; use a low ≥ 0.8"),
])
def test_a_bad_train_scale_is_one_line_naming_the_parameter(scale, message):
    with pytest.raises(ParamsError) as info:
        DataConfig(**SMALL, train_scale=scale)
    assert message in str(info.value) and "\n" not in str(info.value)
