"""Training reads only the cache: no encoder is built, targets are pixels in [0, 1]."""

import dataclasses
import shutil

import pytest
import torch
import zarr

import featinv.encoders.taps
import featinv.training.train
from featinv.training.train import check_image_store
from featinv.config import LossConfig
from featinv.errors import StoreMismatchError, WeightsUnavailableError
from featinv.store.feature_store import FeatureStore, store_path
from featinv.data.image_store import ImageStore
from featinv.errors import ParamsError
from featinv.store.loader import FeatureBatches, FeatureCrop
from featinv.decoders import build_decoder
from featinv.training.model import Reconstructor, load_checkpoint
from featinv.training.step import param_groups
from featinv.training.train import WARM_START_MACS, WARM_START_ROWS, train_decoder, warm_start_keep


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

    monkeypatch.setattr(featinv.encoders.taps, "build_encoder", forbidden)
    monkeypatch.setattr(featinv.encoders.taps, "_build_network", forbidden)
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


@pytest.mark.parametrize("crop", [None, FeatureCrop(8, 2, 1)], ids=["whole maps", "windows"])
def test_split_held_on_the_device_gives_the_same_batches(tiny_images, tiny_features, crop):
    # CUDA holds a split that fits device_cache_gb on the GPU and gathers batches there; the gathers
    # are the same torch code on any device, so the CPU checks them against the host path.
    images = ImageStore(tiny_images)
    arr = FeatureStore(store_path(tiny_features, "vgg16/block1")).split("train")
    kwargs = dict(shuffle=True, seed=3, samples_per_epoch=30, crop=crop, device="cpu")
    host = FeatureBatches([arr], images.pixels("train"), 5, **kwargs)
    held = FeatureBatches([arr], images.pixels("train"), 5, device_cache_gb=1.0, **kwargs)
    assert host.resident is None and held.resident is not None
    for _ in range(2):  # two epochs: each reshuffles (and re-draws windows) the same way
        pairs = list(zip(host, held, strict=True))
        assert len(pairs) == 6
        for (fa, pa), (fb, pb) in pairs:
            assert torch.equal(fa[0], fb[0]) and torch.equal(pa, pb)
            assert fb[0].dtype == torch.float32 and fb[0].is_contiguous(memory_format=torch.channels_last)
    # too big for the budget: gathered on the host; whole_maps (closed-form fits on the CPU) always is
    assert FeatureBatches([arr], images.pixels("train"), 5, device_cache_gb=1e-6).resident is None
    assert held.whole_maps().resident is None


def test_window_loaders_whole_maps_match_a_whole_map_loader(tiny_images, tiny_features):
    # A window loader holds its RAM copy channels-last; the whole maps it hands closed-form warm
    # starts must still be the stored maps, in the same order.
    images = ImageStore(tiny_images)
    arr = FeatureStore(store_path(tiny_features, "vgg16/block1")).split("train")
    windows = FeatureBatches([arr], images.pixels("train"), 5, crop=FeatureCrop(8, 2, 1))
    plain = FeatureBatches([arr], images.pixels("train"), 5)
    assert windows.nhwc and not plain.nhwc
    pairs = list(zip(windows.whole_maps(5), plain.whole_maps(5), strict=True))
    for (fa, pa), (fb, pb) in pairs:
        assert torch.equal(fa[0], fb[0]) and torch.equal(pa, pb)
        assert fa[0].is_contiguous(memory_format=torch.channels_last)


def _locate(window, full_map):
    """(top, left) where ``window`` (C, k, k) sits in ``full_map`` (C, h, w), or None."""
    k = window.shape[-1]
    for top in range(full_map.shape[-2] - k + 1):
        for left in range(full_map.shape[-1] - k + 1):
            if torch.equal(full_map[:, top : top + k, left : left + k], window):
                return top, left
    return None


def test_feature_crops_pair_each_window_with_the_pixels_under_its_centre(tiny_images, tiny_features):
    images = ImageStore(tiny_images)
    arr = FeatureStore(store_path(tiny_features, "vgg16/block1")).split("train")
    crop = FeatureCrop(size=6, scale=2, margin=1)
    (feats, pixels01), = list(FeatureBatches([arr], images.pixels("train"), 12, crop=crop))
    assert FeatureBatches([arr], images.pixels("train"), 12, crop=crop)._windows(10_000).min() == -1
    # Context beyond the map's edge is edge-replicated: look for the windows in a padded map.
    full = torch.nn.functional.pad(torch.from_numpy(arr[:]).float(), (1, 1, 1, 1), mode="replicate")
    full_pixels = torch.from_numpy(images.pixels("train")[:]).permute(0, 3, 1, 2).float() / 255
    assert feats[0].shape == (12, 64, 8, 8) and pixels01.shape == (12, 3, 12, 12)
    corners = set()
    for i in range(12):  # in order (no shuffle): sample i
        top, left = _locate(feats[0][i], full[i])
        corners.add((top, left))
        inner = full_pixels[i, :, top * 2 : (top + 6) * 2, left * 2 : (left + 6) * 2]  # (top, left) of the centre
        assert torch.equal(pixels01[i], inner)
    assert len(corners) > 1  # every sample gets its own window


def test_cropped_streaming_loader_matches_ram_loader_over_several_passes(tiny_images, tiny_features):
    images = ImageStore(tiny_images)
    arr = FeatureStore(store_path(tiny_features, "vgg16/block1")).split("train")
    kwargs = dict(shuffle=True, seed=3, samples_per_epoch=30, crop=FeatureCrop(8, 2, 1))
    ram = list(FeatureBatches([arr], images.pixels("train"), 5, **kwargs))
    streamed = list(FeatureBatches([arr], images.pixels("train"), 5, ram_cache_gb=0, **kwargs))
    assert len(ram) == len(streamed) == 6  # 30 samples from a 12-sample split: 2½ passes
    for (fa, pa), (fb, pb) in zip(ram, streamed):
        assert torch.equal(fa[0], fb[0]) and torch.equal(pa, pb)


def test_local_mlp_trains_on_feature_windows_with_context(tiny_config, tiny_images, tiny_features, tmp_path):
    train = dataclasses.replace(tiny_config.train, feature_crop=16, epochs=1, samples_per_epoch=24)
    cfg = dataclasses.replace(tiny_config, decoder="local_mlp", train=train)
    result = train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")
    assert result.train_steps == 6 and result.best_val_loss < 0.1  # the warm start alone is far better
    too_wide = dataclasses.replace(cfg, train=dataclasses.replace(train, feature_crop=113))
    with pytest.raises(ParamsError, match=r"feature_crop.*1\.\.112"):
        train_decoder(too_wide, tiny_images, tiny_features, tmp_path / "run2")


def test_a_wall_clock_budget_stops_training_mid_epoch(tiny_config, tiny_images, tiny_features, tmp_path):
    # 12 training views in batches of 4: 3 steps an epoch; a budget spent by the first step ends the
    # run there (validated and checkpointed), not after the epoch or the 5 epochs asked for.
    train = dataclasses.replace(tiny_config.train, epochs=5, max_minutes=1e-9)
    result = train_decoder(dataclasses.replace(tiny_config, train=train), tiny_images, tiny_features, tmp_path / "run")
    assert (result.stopped, result.train_steps, result.epochs_run) == ("time_budget", 1, 1)
    assert load_checkpoint(result.best_checkpoint)[1]["finished"]


def test_lpips_loss_offline_is_a_clear_error(tiny_config, tiny_images, tiny_features, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    import featinv.training.losses

    featinv.training.losses.load_lpips.cache_clear()
    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, loss=LossConfig(lpips=0.5)))
    with pytest.raises(WeightsUnavailableError, match="train.loss.lpips: 0"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")
    featinv.training.losses.load_lpips.cache_clear()


def test_lpips_offline_fails_before_building_alexnet(tmp_path, monkeypatch):
    """Every study cell asks for LPIPS: offline, the missing weights are found before AlexNet is built."""
    import lpips

    import featinv.training.losses

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # downloads fail here (conftest)
    monkeypatch.setattr(lpips, "LPIPS", lambda *a, **k: pytest.fail("built LPIPS without its weights"))
    featinv.training.losses.load_lpips.cache_clear()
    try:
        with pytest.raises(WeightsUnavailableError, match="alexnet-owt-7be5be79.pth"):
            featinv.training.losses.load_lpips()
    finally:
        featinv.training.losses.load_lpips.cache_clear()


def test_store_from_other_params_is_refused(tiny_config, tiny_images, tiny_features, tmp_path):
    cfg = dataclasses.replace(tiny_config, extract=dataclasses.replace(tiny_config.extract, weights_seed=7))
    with pytest.raises(StoreMismatchError, match="random:seed=7"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")


def test_ensembles_train_from_the_cached_stores_only(tiny_config, tiny_images, tiny_features, tmp_path, monkeypatch):
    from featinv.store.feature_store import extract_features

    from conftest import TINY_EXTRACT

    shallow = ["resnet34/layer1", "vgg16/block1", "vit_small/block1", "pvt_v2_b2/stage1"]
    for tap in shallow:  # the ensemble's stores, extracted beforehand as the pipeline does
        extract_features(tiny_images, tap, store_path(tiny_features, tap), TINY_EXTRACT)

    def forbidden(*args, **kwargs):
        raise AssertionError("an encoder was constructed during ensemble training")

    monkeypatch.setattr(featinv.encoders.taps, "build_encoder", forbidden)
    monkeypatch.setattr(featinv.encoders.taps, "_build_network", forbidden)
    cfg = dataclasses.replace(tiny_config, encoder="ensemble", fusion="attention", decoder="wavelet",
                              train=dataclasses.replace(tiny_config.train, epochs=1))
    result = train_decoder(cfg, tiny_images, tiny_features, tmp_path / "ens")
    model, meta = load_checkpoint(result.best_checkpoint)
    assert [t["name"] for t in meta["taps"]] == shallow and meta["fusion"] == "attention"
    assert model.fusion is not None


def test_a_run_killed_before_its_first_epoch_leaves_no_previous_checkpoint(tiny_config, tiny_images, tiny_features,
                                                                            tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_decoder(tiny_config, tiny_images, tiny_features, out)
    assert (out / "best.pt").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill during the first epoch looks like from inside

    monkeypatch.setattr(featinv.training.train, "_validate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(dataclasses.replace(tiny_config, decoder="wavelet"), tiny_images, tiny_features, out)
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def test_checkpoints_say_whether_their_run_finished(tiny_config, tiny_images, tiny_features, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_validate = featinv.training.train._validate

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(featinv.training.train, "_validate", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_decoder(tiny_config, tiny_images, tiny_features, out)
    _, meta = load_checkpoint(out / "best.pt")
    assert meta["finished"] is False and "train_result" not in meta
    monkeypatch.setattr(featinv.training.train, "_validate", real_validate)
    train_decoder(tiny_config, tiny_images, tiny_features, out)
    for name in ("best.pt", "last.pt"):
        _, meta = load_checkpoint(out / name)
        assert meta["finished"] is True and meta["train_result"]["epochs_run"] == 2


def test_train_refuses_an_image_store_prepared_with_other_data_params(tiny_config, tiny_images, tiny_features,
                                                                      tmp_path):
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, resize=288))
    with pytest.raises(StoreMismatchError, match="data.resize: image store built with 256, params say 288"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(StoreMismatchError, match="seed: image store built with 42, params say 7"):
        train_decoder(dataclasses.replace(tiny_config, seed=7), tiny_images, tiny_features, tmp_path / "run")
    scaled = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train_scale=(1.0, 1.5)))
    with pytest.raises(StoreMismatchError, match=r"data.train_scale: image store built with \[1.0, 1.0\], "
                                                 r"params say \[1.0, 1.5\]"):
        train_decoder(scaled, tiny_images, tiny_features, tmp_path / "run")


def test_a_store_from_before_train_scale_was_recorded_counts_as_the_published_views(tiny_config, tiny_images,
                                                                                   tmp_path):
    """Image stores made before data.train_scale and data.train_orientations existed made the
    published views: [1, 1] and horizontal flips."""
    old = tmp_path / "images.zarr"
    shutil.copytree(tiny_images, old)
    group = zarr.open_group(str(old), mode="r+")
    data = dict(group.attrs["data"])
    del data["train_scale"], data["train_orientations"], data["train_channel_orders"]
    group.attrs["data"] = data
    check_image_store(tiny_config, ImageStore(old))  # made as [1, 1] makes views: accepted
    scaled = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train_scale=(1.0, 1.5)))
    with pytest.raises(StoreMismatchError, match=r"data.train_scale: image store built with \[1.0, 1.0\]"):
        check_image_store(scaled, ImageStore(old))
    turned = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train_orientations="dihedral"))
    with pytest.raises(StoreMismatchError, match="data.train_orientations: image store built with 'horizontal', params say 'dihedral'"):
        check_image_store(turned, ImageStore(old))
    shuffled = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train_channel_orders="shuffled"))
    with pytest.raises(StoreMismatchError, match="data.train_channel_orders: image store built with 'rgb', params say 'shuffled'"):
        check_image_store(shuffled, ImageStore(old))


def test_train_refuses_stores_extracted_with_other_extract_params(tiny_config, tiny_images, tiny_features, tmp_path):
    cfg = dataclasses.replace(tiny_config, extract=dataclasses.replace(tiny_config.extract, codec="lz4"))
    with pytest.raises(StoreMismatchError, match="extract.codec: store built with 'zstd', params say 'lz4'"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")
    cfg = dataclasses.replace(tiny_config, extract=dataclasses.replace(tiny_config.extract, weights_seed=3))
    with pytest.raises(StoreMismatchError, match="weights"):
        train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_training_on_the_cpu_is_taken_only_where_the_cpu_computes_it(tiny_config, tiny_images, tiny_features,
                                                                              tmp_path, monkeypatch, native):
    from featinv import precision

    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: native)
    train = dataclasses.replace(tiny_config.train, feature_crop=16, epochs=1, samples_per_epoch=8, precision="bfloat16")
    cfg = dataclasses.replace(tiny_config, decoder="local_mlp", train=train)
    result = train_decoder(cfg, tiny_images, tiny_features, tmp_path / "run")
    _, meta = load_checkpoint(result.best_checkpoint)
    assert result.precision == meta["train_result"]["precision"] == ("bfloat16" if native else "float32")
    assert any("no native bf16" in note for note in result.fallbacks) != native
    if native:  # the evaluation's metrics say what the decoder was trained in
        from featinv.evaluation.evaluate import evaluate_run

        metrics = evaluate_run(result.best_checkpoint, tiny_images, tiny_features, cfg.evaluate,
                               tmp_path / "eval.json", tmp_path / "eval.csv", tmp_path / "grid.png")
        assert metrics["train"]["precision"] == "bfloat16"


@pytest.mark.parametrize("decoder, exempt", [("local_mlp", ("linear",)), ("residual_shuffle", ("linear", "rf_readout"))])
def test_weight_decay_shrinks_the_learned_layers_but_not_the_ridge_fit(decoder, exempt):
    model = Reconstructor(build_decoder(decoder, (16, 28, 28), 56))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no loss: any change is the decay's
    optimizer.step()
    for name, p in model.named_parameters():
        ridge = any(name.startswith(f"decoder.{prefix}.") for prefix in exempt)
        if ridge:
            assert torch.equal(p, before[name]), f"{name} (a ridge fit) was decayed"
        elif before[name].abs().sum() > 0:
            assert p.abs().sum() < before[name].abs().sum(), f"{name} was not decayed"
    assert any(name.startswith("decoder.linear.") for name in before)


def test_a_checkpoint_from_before_train_scale_is_the_run_of_the_published_views(tiny_config):
    from featinv.training.model import check_checkpoint
    config = dataclasses.asdict(tiny_config)
    old = {**config, "data": {k: v for k, v in config["data"].items()
                              if k not in ("train_scale", "train_orientations", "train_channel_orders")}}
    assert check_checkpoint("old.pt", {"finished": True, "config": old}, config) == []
    scaled = dataclasses.asdict(dataclasses.replace(
        tiny_config, data=dataclasses.replace(tiny_config.data, train_scale=(1.0, 1.5))))
    (problem,) = check_checkpoint("old.pt", {"finished": True, "config": old}, scaled)
    assert "data.train_scale: checkpoint has [1.0, 1.0], params say [1.0, 1.5]" in problem


def test_a_checkpoint_from_before_the_log_mse_loss_trained_without_it(tiny_config):
    from featinv.training.model import check_checkpoint
    config = dataclasses.asdict(tiny_config)
    loss = {k: v for k, v in config["train"]["loss"].items() if not k.startswith("log_mse")}
    old = {**config, "train": {**config["train"], "loss": loss}}
    assert check_checkpoint("old.pt", {"finished": True, "config": old}, config) == []
    with_log = dataclasses.asdict(dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, loss=dataclasses.replace(tiny_config.train.loss, log_mse=1.0))))
    (problem,) = check_checkpoint("old.pt", {"finished": True, "config": old}, with_log)
    assert "train.loss.log_mse: checkpoint has 0.0, params say 1.0" in problem


def test_the_warm_start_samples_fewer_positions_only_where_its_normal_equations_would_be_too_costly():
    # trained vgg16/block1 (64·9 + 1 columns → 12 targets), 544 maps of 112×112: ~WARM_START_ROWS positions
    assert warm_start_keep(544 * 112 * 112, (577, 12)) * 544 * 112 * 112 == pytest.approx(WARM_START_ROWS)
    # a 14×14 tap with few maps keeps every position
    assert warm_start_keep(544 * 14 * 14, (577, 768)) == 1.0
    # vgg16/block5 (512·9 + 1 columns → 3·32² targets) on 96 views of 68 images: its cost capped
    positions = 96 * 68 * 7 * 7
    rows = warm_start_keep(positions, (4609, 3072)) * positions
    assert rows * 4609 * (4609 + 3072) == pytest.approx(WARM_START_MACS) and rows < positions
    assert warm_start_keep(positions, None) == 1.0  # a decoder that does not declare its design: no cap
