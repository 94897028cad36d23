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
