import pytest

from featinv.config import Config, load_params, with_overrides
from featinv.errors import ParamsError

from conftest import REPO


def test_repo_params_file_is_valid():
    cfg = load_params(REPO / "params.yaml")
    assert cfg.data.source == "sample"
    assert "vgg16/block1" in cfg.taps


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"train": {"loss": {"lpipz": 1}}}, "train.loss.lpipz"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"lr": True}}, "train.lr"),
        ({"data": {"source": "web"}}, "sample, folder, div2k"),
        ({"taps": "vgg16/block1"}, "taps` must be a list"),
        ({"bogus": 1}, "bogus"),
        ({"train": 3}, "`train` must be a mapping"),
        ({"evaluate": {"refine_optimizer": "sgd"}}, "evaluate.refine_optimizer` = 'sgd' is not valid; choices: adam, lbfgs"),
        ({"evaluate": {"refine_smooth": 0}}, "evaluate.refine_smooth` = 0 must be ≥ 1"),
        ({"evaluate": {"refine": -5}}, "evaluate.refine` = -5 must be ≥ 0"),
        ({"evaluate": {"refine_samples": 4}}, "needs `evaluate.refine_noise` > 0"),
        ({"evaluate": {"refine_noise": -0.1}}, "evaluate.refine_noise` = -0.1 must be ≥ 0"),
        ({"evaluate": {"refine_backproject": -1}}, "evaluate.refine_backproject` = -1 must be ≥ 0"),
        ({"evaluate": {"refine_backproject_step": 0.0}}, "evaluate.refine_backproject_step` = 0.0 must be > 0"),
    ],
)
def test_bad_params_name_the_key(params, fragment):
    with pytest.raises(ParamsError) as info:
        Config.from_params(params)
    assert fragment in str(info.value)


def test_ints_accepted_as_floats_and_lists_as_tuples():
    cfg = Config.from_params({"train": {"lr": 1}, "taps": ["a", "b"]})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.taps == ("a", "b")


def test_overrides_apply_and_validate():
    cfg = with_overrides(Config(), ["decoder=wavelet", "train.loss.lpips=0.5", "fusion=null"])
    assert cfg.decoder == "wavelet" and cfg.train.loss.lpips == 0.5 and cfg.fusion is None
    with pytest.raises(ParamsError, match="train.nope"):
        with_overrides(Config(), ["train.nope=1"])
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        with_overrides(Config(), ["decoder"])


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("extract.batch_size=-1", "`extract.batch_size` = -1 must be ≥ 1"),
        ("extract.batch_size=0", "`extract.batch_size` = 0 must be ≥ 1"),
        ("extract.chunk_samples=0", "`extract.chunk_samples` = 0 must be ≥ 1"),
        ("extract.clevel=12", "`extract.clevel` = 12 must be in [0, 9]"),
        ("extract.codec=gzip", "`extract.codec` = 'gzip' is not valid; choices: zstd, lz4, none"),
        ("extract.device=gpu", "`extract.device` = 'gpu' is not a device"),
        ("extract.normalisation=caffe", "choices: auto, imagenet, inception"),
        ("train.batch_size=0", "`train.batch_size` = 0 must be ≥ 1"),
        ("train.batch_size=-4", "`train.batch_size` = -4 must be ≥ 1"),
        ("train.epochs=0", "`train.epochs` = 0 must be ≥ 1"),
        ("train.epochs=-3", "`train.epochs` = -3 must be ≥ 1"),
        ("train.lr=-1", "`train.lr` = -1.0 must be > 0"),
        ("train.plateau_factor=1.5", "`train.plateau_factor` = 1.5 must be in (0, 1)"),
        ("train.samples_per_epoch=0", "`train.samples_per_epoch` = 0 must be ≥ 1"),
        ("train.loss.lpips=-0.5", "`train.loss.lpips` = -0.5 must be ≥ 0"),
        ("train.loss.mse=0", "nothing would be trained"),
        ("train.loss.log_mse_floor=0", "`train.loss.log_mse_floor` = 0.0 must be > 0"),
        ("data.train_views=0", "`data.train_views` = 0 must be ≥ 1"),
        ("data.resize=0", "`data.resize` = 0 must be ≥ 1"),
        ("data.resize=200", "`data.crop` = 224 must not exceed `data.resize` = 200"),
        ("data.val_fraction=-0.5", "`data.val_fraction` = -0.5 must be in [0, 1)"),
        ("data.test_fraction=1", "`data.test_fraction` = 1.0 must be in [0, 1)"),
        ("study.epochs=0", "`study.epochs` = 0 must be ≥ 1"),
        ("evaluate.grid_images=0", "`evaluate.grid_images` = 0 must be ≥ 1"),
    ],
)
def test_out_of_range_settings_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ParamsError) as info:
        with_overrides(Config(), [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_weights_may_be_one_value_or_a_mapping_with_a_default():
    assert with_overrides(Config(), ["extract.weights=imagenet"]).extract.weights == "imagenet"
    cfg = with_overrides(Config(), ["extract.weights={vgg16: w.pth, 'timm:tf_efficientnet_lite0': l.pth, default: random}"])
    assert cfg.extract.weights == {"vgg16": "w.pth", "timm:tf_efficientnet_lite0": "l.pth", "default": "random"}
    with pytest.raises(ParamsError, match="mapping without a `default`.*vgg16"):
        with_overrides(Config(), ["extract.weights={vgg16: w.pth}"])
    with pytest.raises(ParamsError, match="extract.weights.vgg16"):
        with_overrides(Config(), ["extract.weights={vgg16: 3, default: random}"])
