"""A trained run is scored on a folder it never saw, with its own preprocessing and encoder settings."""

import dataclasses

import pytest
from typer.testing import CliRunner

from featinv.cli import app
from featinv.config import ExtractConfig
from featinv.errors import StoreMismatchError
from featinv.evaluation.evaluate import evaluate_run
from featinv.store.feature_store import extract_features, store_path
from featinv.evaluation.heldout import evaluate_on_folder, heldout_work_dir
from featinv.training.train import train_decoder

from conftest import photo, write_image


@pytest.fixture(scope="module")
def run(tiny_images, tiny_features, tmp_path_factory):
    from featinv.config import Config

    from conftest import TINY_DATA

    cfg = Config.from_params({"data": dataclasses.asdict(TINY_DATA), "extract": {"device": "cpu"},
                              "train": {"epochs": 1, "device": "cpu", "lr": 1e-3}})
    return train_decoder(cfg, tiny_images, tiny_features, tmp_path_factory.mktemp("run")).best_checkpoint


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        write_image(tmp_path / "heldout" / f"img{i}.png", photo(260, seed=10 + i))
    write_image(tmp_path / "heldout" / "sub" / "small.jpg", photo(120, seed=20))  # upsampled, like any image
    return tmp_path / "heldout"


def test_a_run_is_scored_on_a_held_out_folder_with_its_baselines(run, folder, tmp_path, tiny_config):
    work = heldout_work_dir(tmp_path / "cache", folder)
    metrics = evaluate_on_folder(run, folder, work, tiny_config.evaluate, tmp_path / "out")
    assert metrics["n_images"] == 4 and (tmp_path / "out" / "eval.json").is_file()
    assert set(metrics["baselines"]) == {"dataset_mean", "mean_colour", "thumbnail_112x112"}  # the run's train mean
    ids = (tmp_path / "out" / "eval_per_image.csv").read_text().splitlines()
    assert any(line.startswith("sub/small,") for line in ids)
    # The folder's features are cached: a second evaluation extracts nothing.
    store = store_path(work / "features", "vgg16/block1")
    before = (store / "zarr.json").stat().st_mtime_ns
    again = evaluate_on_folder(run, folder, work, tiny_config.evaluate, tmp_path / "out2")
    assert (store / "zarr.json").stat().st_mtime_ns == before and again["psnr"] == metrics["psnr"]


def test_evaluate_refuses_features_made_with_other_encoder_settings(run, tiny_images, tmp_path, tiny_config):
    other = tmp_path / "features"
    extract_features(tiny_images, "vgg16/block1", store_path(other, "vgg16/block1"),
                     ExtractConfig(device="cpu", batch_size=4, weights_seed=1))
    with pytest.raises(StoreMismatchError, match="weights: store has 'random:seed=1', the run was trained on "
                                                 "'random:seed=0'"):
        evaluate_run(run, tiny_images, other, tiny_config.evaluate, tmp_path / "e.json", tmp_path / "e.csv",
                     tmp_path / "e.png")


def test_cli_evaluate_on_a_folder(run, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate: {device: cpu, grid_images: 2}\n")
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run), "--on", str(folder)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "over 4 test images" in output and "over the 112x112 thumbnail" in output
    assert list((tmp_path / "data" / "heldout").glob("heldout-*/metrics/eval.json"))
