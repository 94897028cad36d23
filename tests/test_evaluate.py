"""Evaluation writes a stable metrics schema, a per-image CSV and a reconstruction grid."""

import csv
import json

import pytest
from PIL import Image

from featinv.config import EvaluateConfig
from featinv.evaluate import evaluate_run
from featinv.train import train_decoder


@pytest.fixture(scope="module")
def trained(tiny_images, tiny_features, tmp_path_factory):
    from featinv.config import Config

    cfg = Config.from_params({"train": {"epochs": 1, "device": "cpu", "lr": 1e-3}, "extract": {"device": "cpu"}})
    out = tmp_path_factory.mktemp("run")
    return train_decoder(cfg, tiny_images, tiny_features, out).best_checkpoint


def test_reports(trained, tiny_images, tiny_features, tmp_path):
    paths = tmp_path / "eval.json", tmp_path / "per_image.csv", tmp_path / "grid.png"
    metrics = evaluate_run(trained, tiny_images, tiny_features, EvaluateConfig(device="cpu", grid_images=2), *paths)
    on_disk = json.loads(paths[0].read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for name in ("psnr", "ssim"):
        assert set(on_disk[name]) == {"mean", "std", "min", "max"}
    assert 5 < on_disk["psnr"]["mean"] < 60 and 0 < on_disk["ssim"]["mean"] <= 1
    assert on_disk["n_images"] == 2 and on_disk["weights"] == "random:seed=0"
    assert any("random" in note for note in on_disk["notes"])  # the fallback is recorded
    rows = list(csv.DictReader(paths[1].open()))
    assert len(rows) == 2 and {"image", "psnr", "ssim", "lpips"} <= set(rows[0])
    grid = Image.open(paths[2])
    assert grid.width >= 3 * 224 and grid.height >= 2 * 224


def test_refinement_lowers_feature_error_and_is_reported(trained, tiny_images, tiny_features, tmp_path):
    paths = tmp_path / "eval.json", tmp_path / "per_image.csv", tmp_path / "grid.png"
    cfg = EvaluateConfig(device="cpu", refine=15, refine_lr=0.01)
    metrics = evaluate_run(trained, tiny_images, tiny_features, cfg, *paths)
    report = metrics["refine"]
    assert report["max_steps"] == 15 and report["lr"] == 0.01
    assert report["feature_loss_final"] < 0.7 * report["feature_loss_initial"]
    assert "decoder_only" in metrics
