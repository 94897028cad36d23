"""Training reads only the cache: no encoder is built, targets are pixels in [0, 1]."""

import dataclasses

import pytest
import torch

import featinv.taps
from featinv.config import LossConfig
from featinv.errors import StoreMismatchError, WeightsUnavailableError
from featinv.feature_store import FeatureStore, store_path
from featinv.image_store import ImageStore
from featinv.loader import FeatureBatches
from featinv.model import load_checkpoint
from featinv.train import train_decoder


class _Recorder:
    def __init__(self):
        self.epochs = []

    def log_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))


@pytest.fixture
def no_encoder(monkeypatch):
    """Any attempt to build an encoder (or a network family) fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder was constructed during training")

    monkeypatch.setattr(featinv.taps, "build_encoder", forbidden)
    monkeypatch.setattr(featinv.taps, "_build_network", forbidden)
    import torchvision
    import timm

    monkeypatch.setattr(torchvision.models, "vgg16", forbidden)
    monkeypatch.setattr(timm, "create_model", forbidden)


def test_training_never_builds_the_encoder(tiny_config, tiny_images, tiny_features, tmp_path, no_encoder):
    logger = _Recorder()
    result = train_decoder(tiny_config, tiny_images, tiny_features, tmp_path / "run", logger=logger)
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    assert [e for e, _ in logger.epochs] == [1, 2]
    assert {"train/loss", "val/loss", "val/psnr", "lr"} <= set(logger.epochs[0][1])
    model, meta = load_checkpoint(result.best_checkpoint)
    assert meta["encoder"] == "vgg16/block1" and meta["weights"] == "random:seed=0"
    assert meta["train_result"]["epochs_run"] == 2 and meta["crop"] == 224


def test_targets_are_pixels_in_unit_range(tiny_images, tiny_features):
    images = ImageStore(tiny_images)
    store = FeatureStore(store_path(tiny_features, "vgg16/block1"))
    feats, pixels01 = next(iter(FeatureBatches([store.split("train")], images.pixels("train"), 4)))
    assert pixels01.min() >= 0 and pixels01.max() <= 1 and pixels01.max() > 0.5
    expected = torch.from_numpy(images.pixels("train")[:4]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(pixels01, expected)  # raw pixels, not ImageNet-normalised
    assert feats[0].dtype == torch.float32 and feats[0].shape == (4, 64, 112, 112)


def test_streaming_loader_matches_ram_loader(tiny_images, tiny_features):
    images = ImageStore(tiny_images)
    arr = FeatureStore(store_path(tiny_features, "vgg16/block1")).split("train")
    ram = list(FeatureBatches([arr], images.pixels("train"), 5, shuffle=True, seed=3))
    streamed = list(FeatureBatches([arr], images.pixels("train"), 5, shuffle=True, seed=3, ram_cache_gb=0))
    assert len(ram) == len(streamed) == 3
    for (fa, pa), (fb, pb) in zip(ram, streamed):
        assert torch.equal(fa[0], fb[0]) and torch.equal(pa, pb)


def test_lpips_loss_offline_is_a_clear_error(tiny_config, tiny_images, tiny_features, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    import featinv.losses

    featinv.losses.load_lpips.cache_clear()
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, loss=LossConfig(lpips=0.5)))
    with pytest.raises(WeightsUnavailableError, match="train.loss.lpips: 0"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")
    featinv.losses.load_lpips.cache_clear()


def test_store_from_other_params_is_refused(tiny_config, tiny_images, tiny_features, tmp_path):
    cfg = dataclasses.replace(tiny_config, extract=dataclasses.replace(tiny_config.extract, weights_seed=7))
    with pytest.raises(StoreMismatchError, match="random:seed=7"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")


def test_ensembles_train_from_the_cached_stores_only(tiny_config, tiny_images, tiny_features, tmp_path, monkeypatch):
    from featinv.feature_store import extract_features

    from conftest import TINY_EXTRACT

    shallow = ["resnet34/layer1", "vgg16/block1", "vit_small/block1", "pvt_v2_b2/stage1"]
    for tap in shallow:  # the ensemble's stores, extracted beforehand as the pipeline does
        extract_features(tiny_images, tap, store_path(tiny_features, tap), TINY_EXTRACT)

    def forbidden(*args, **kwargs):
        raise AssertionError("an encoder was constructed during ensemble training")

    monkeypatch.setattr(featinv.taps, "build_encoder", forbidden)
    monkeypatch.setattr(featinv.taps, "_build_network", forbidden)
    cfg = dataclasses.replace(tiny_config, encoder="ensemble", fusion="attention", decoder="wavelet",
                              train=dataclasses.replace(tiny_config.train, epochs=1))
    result = train_decoder(cfg, tiny_images, tiny_features, tmp_path / "ens")
    model, meta = load_checkpoint(result.best_checkpoint)
    assert [t["name"] for t in meta["taps"]] == shallow and meta["fusion"] == "attention"
    assert model.fusion is not None
