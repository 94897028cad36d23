"""The feature store: fingerprints, reuse, atomic writes and exact resume."""

import numpy as np
import pytest

import featinv.store.feature_store as fs
from featinv.config import ExtractConfig
from featinv.errors import FeatinvError, StoreIncompleteError, StoreMismatchError
from featinv.store.feature_store import FeatureStore, expected_fingerprint, extract_features, store_path
from featinv.data.image_store import ImageStore
from featinv.encoders.taps import resolve_tap

from conftest import TINY_EXTRACT


def test_store_layout_and_attrs(tiny_images, tiny_features):
    store = FeatureStore(store_path(tiny_features, "vgg16/block1"))
    train = store.split("train")
    assert train.shape == (12, 64, 112, 112) and train.dtype == np.float16
    assert train.chunks[0] == 1
    assert store.attrs["weights"] == "random:seed=0"
    assert store.attrs["device"] == "cpu"
    assert store.attrs["image_ids"]["test"] == ImageStore(tiny_images).ids("test")


def test_fingerprint_mismatch_says_what_differs(tiny_images, tiny_features):
    images = ImageStore(tiny_images)
    spec = resolve_tap("vgg16/block1")
    ok = expected_fingerprint(spec, TINY_EXTRACT, images)
    FeatureStore(store_path(tiny_features, "vgg16/block1"), expected=ok)
    wrong = expected_fingerprint(spec, ExtractConfig(weights_seed=1), images)
    with pytest.raises(StoreMismatchError, match="weights: store has 'random:seed=0', params want 'random:seed=1'"):
        FeatureStore(store_path(tiny_features, "vgg16/block1"), expected=wrong)


def test_matching_store_is_reused_without_running_the_encoder(tiny_images, tiny_features, monkeypatch):
    monkeypatch.setattr(fs, "build_encoder", lambda *a, **k: pytest.fail("encoder built"))
    report = extract_features(tiny_images, "vgg16/block1", store_path(tiny_features, "vgg16/block1"), TINY_EXTRACT)
    assert report.reused and report.computed == 0


def test_activations_beyond_float16_fail_extraction_and_leave_no_store(tiny_images, tmp_path, monkeypatch):
    real_build = fs.build_encoder

    def loud_encoder(*args, **kwargs):  # the tap's real encoder, its activations scaled past ±65504
        encoder = real_build(*args, **kwargs)
        encoder.register_forward_hook(lambda module, inputs, output: output * 1e9)
        return encoder

    monkeypatch.setattr(fs, "build_encoder", loud_encoder)
    out = tmp_path / "loud.zarr"
    with pytest.raises(FeatinvError, match="tap vgg16/block1: activations overflow float16 storage"):
        extract_features(tiny_images, "vgg16/block1", out, ExtractConfig(device="cpu", batch_size=4))
    assert not out.exists()  # the partial store is never committed


def test_killed_extraction_resumes_to_an_identical_store(tiny_images, tmp_path, monkeypatch):
    cfg = ExtractConfig(device="cpu", batch_size=2)
    reference = tmp_path / "ref.zarr"
    extract_features(tiny_images, "resnet34/layer1", reference, cfg)

    out = tmp_path / "resumed.zarr"
    real_forward = fs._forward
    calls = {"n": 0}

    def dying_forward(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed half-way through the train split
        return real_forward(*args)

    monkeypatch.setattr(fs, "_forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny_images, "resnet34/layer1", out, cfg)
    assert not out.exists()  # nothing that looks complete
    with pytest.raises(StoreIncompleteError, match="interrupted"):
        FeatureStore(out)

    monkeypatch.setattr(fs, "_forward", real_forward)
    report = extract_features(tiny_images, "resnet34/layer1", out, cfg)
    total = sum(report.counts.values())
    assert report.computed == total - 6  # three batches of two were already on disk
    a, b = FeatureStore(reference), FeatureStore(out)
    for split in ("train", "val", "test"):
        assert np.array_equal(a.split(split)[:], b.split(split)[:])
    assert a.attrs["fingerprint"] == b.attrs["fingerprint"]


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreIncompleteError, match="dvc repro"):
        FeatureStore(tmp_path / "nothing.zarr")


def test_a_store_with_a_split_not_fully_written_is_refused_and_re_extracted(tiny_images, tmp_path):
    from featinv.zarr_utils import open_group

    out = tmp_path / "short.zarr"
    extract_features(tiny_images, "vgg16/block1", out, TINY_EXTRACT)
    group = open_group(out, mode="r+")
    group.attrs.update({"written": {"train": 0, "val": 2, "test": 2}})  # what batch_size=-1 used to commit
    with pytest.raises(StoreIncompleteError, match="split 'train' has 0 samples written of 12"):
        FeatureStore(out)
    report = extract_features(tiny_images, "vgg16/block1", out, TINY_EXTRACT)
    assert not report.reused and report.computed == 16
    FeatureStore(out)


def test_disk_full_during_extraction_is_one_clear_error_and_resumable(tiny_images, tmp_path, monkeypatch):
    import errno

    from featinv.errors import StorageError

    out = tmp_path / "full.zarr"
    real_put = fs._Writer.put
    calls = {"n": 0}

    def full_disk(self, split, array, begin, end, feats):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, split, array, begin, end, feats)

    monkeypatch.setattr(fs._Writer, "put", full_disk)
    with pytest.raises(StorageError, match=r"full\.zarr\.partial: cannot write the feature store \(No space left"):
        extract_features(tiny_images, "vgg16/block1", out, TINY_EXTRACT)
    assert not out.exists()
    monkeypatch.setattr(fs._Writer, "put", real_put)
    report = extract_features(tiny_images, "vgg16/block1", out, TINY_EXTRACT)
    assert report.computed == 16 - 8  # the two batches written before the disk filled are kept


def test_store_paths_are_the_ones_dvc_yaml_writes():
    # dvc.yaml: `--out data/features/${item}.zarr` for every tap in `taps`, timm taps included.
    assert store_path("data/features", "vgg16/block1").as_posix() == "data/features/vgg16/block1.zarr"
    assert (store_path("data/features", "timm:tf_efficientnet_lite0/blocks.2").as_posix()
            == "data/features/timm:tf_efficientnet_lite0/blocks.2.zarr")
