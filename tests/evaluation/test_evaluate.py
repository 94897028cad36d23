"""Evaluation writes a stable metrics schema, a per-image CSV and a reconstruction grid."""

import csv
import dataclasses
import json

import pytest
from PIL import Image

from featinv.config import EvaluateConfig
from featinv.errors import CheckpointError
from featinv.evaluation.evaluate import evaluate_run
from featinv.training.train import train_decoder

from conftest import TINY_DATA


@pytest.fixture(scope="module")
def trained(tiny_images, tiny_features, tmp_path_factory):
    from featinv.config import Config

    cfg = Config.from_params({"data": dataclasses.asdict(TINY_DATA), "extract": {"device": "cpu"},
                              "train": {"epochs": 1, "device": "cpu", "lr": 1e-3}})
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


def test_back_projection_uses_the_runs_decoder_and_is_reported(trained, tiny_images, tiny_features, tmp_path):
    settings = {"device": "cpu", "refine": 2, "refine_optimizer": "lbfgs", "refine_smooth": 2}
    psnr = {}
    for backproject in (0, 1):
        paths = tmp_path / f"eval{backproject}.json", tmp_path / "per_image.csv", tmp_path / "grid.png"
        cfg = EvaluateConfig(**settings, refine_backproject=backproject)
        metrics = evaluate_run(trained, tiny_images, tiny_features, cfg, *paths)
        assert metrics["refine"]["backproject"] == backproject
        psnr[backproject] = metrics["psnr"]["mean"]
    assert psnr[1] != psnr[0]  # the decoder's correction was applied


def test_reconstruct_command_takes_a_users_jpeg_and_png_and_writes_the_comparison(trained, tmp_path):
    from typer.testing import CliRunner

    from conftest import photo, write_image
    from featinv.cli import app

    jpeg = write_image(tmp_path / "holiday.jpg", photo(300, seed=1), quality=90)
    grey_png = write_image(tmp_path / "scan.png", photo(260, seed=2)[..., 0], mode="L")
    out = tmp_path / "side_by_side.png"
    args = ["reconstruct", str(jpeg), str(grey_png), "--run", str(trained), "--device", "cpu", "-o", str(out),
            "--refine", "2", "--refine-optimizer", "lbfgs", "--refine-samples", "2", "--refine-noise", "0.05",
            "--refine-backproject", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "holiday.jpg: PSNR" in result.output and "scan.png: PSNR" in result.output
    figure = Image.open(out)
    assert figure.width >= 3 * 224 and figure.height >= 2 * 224  # original | reconstruction | difference, 2 rows

    refused = tmp_path / "refused.png"
    result = CliRunner().invoke(app, ["reconstruct", str(jpeg), "--run", str(trained), "--device", "cpu",
                                      "-o", str(refused), "--refine", "2", "--refine-samples", "3"])
    assert result.exit_code == 1 and "refine_noise" in result.output and "Traceback" not in result.output
    assert not refused.exists()


def _paths(tmp_path):
    return tmp_path / "eval.json", tmp_path / "per_image.csv", tmp_path / "grid.png"


def test_evaluate_refuses_a_checkpoint_trained_with_other_params(tiny_config, tiny_images, tiny_features, tmp_path):
    import dataclasses

    run = train_decoder(tiny_config, tiny_images, tiny_features, tmp_path / "run").best_checkpoint
    wavelet = dataclasses.replace(tiny_config, decoder="wavelet")
    with pytest.raises(CheckpointError, match="decoder: checkpoint has 'transposed_conv', params say 'wavelet'"):
        evaluate_run(run, tiny_images, tiny_features, tiny_config.evaluate, *_paths(tmp_path), run_config=wavelet)
    assert not (tmp_path / "eval.json").exists()
    # Named on purpose: evaluated, and the metrics say what differs.
    metrics = evaluate_run(run, tiny_images, tiny_features, tiny_config.evaluate, *_paths(tmp_path),
                           run_config=wavelet, strict=False)
    assert any("params say 'wavelet'" in note for note in metrics["notes"])
    assert evaluate_run(run, tiny_images, tiny_features, tiny_config.evaluate, *_paths(tmp_path),
                        run_config=tiny_config)["decoder"] == "transposed_conv"


def test_evaluate_refuses_an_unfinished_run(tiny_config, tiny_images, tiny_features, tmp_path):
    import torch

    run = train_decoder(tiny_config, tiny_images, tiny_features, tmp_path / "run").best_checkpoint
    payload = torch.load(run, weights_only=False)
    payload.update(finished=False, epoch=1)
    payload.pop("train_result")
    torch.save(payload, run)  # what a run killed after its first epoch leaves
    with pytest.raises(CheckpointError, match="did not finish .*epoch 1"):
        evaluate_run(run, tiny_images, tiny_features, tiny_config.evaluate, *_paths(tmp_path), run_config=tiny_config)
    metrics = evaluate_run(run, tiny_images, tiny_features, tiny_config.evaluate, *_paths(tmp_path),
                           run_config=tiny_config, strict=False)
    assert any("did not finish" in note for note in metrics["notes"])


def test_ids_that_are_not_ascii_reach_the_csv(trained, tiny_images, tiny_features, tmp_path, monkeypatch):
    from featinv.data.image_store import ImageStore

    monkeypatch.setattr(ImageStore, "ids", lambda self, split: [f"café_{i}" for i in range(self.count(split))])
    paths = _paths(tmp_path)
    evaluate_run(trained, tiny_images, tiny_features, EvaluateConfig(device="cpu", grid_images=2), *paths)
    assert "café_0" in paths[1].read_text(encoding="utf-8")
    assert not list(tmp_path.glob("*.tmp"))


def test_metrics_report_the_taps_non_learned_baselines(trained, tiny_images, tiny_features, tmp_path):
    metrics = evaluate_run(trained, tiny_images, tiny_features, EvaluateConfig(device="cpu", grid_images=2),
                           *_paths(tmp_path))
    baselines = metrics["baselines"]
    assert set(baselines) == {"dataset_mean", "mean_colour", "thumbnail_112x112"}  # vgg16/block1's grid
    assert baselines["thumbnail_112x112"]["grid"] == [112, 112]
    # A 112×112 thumbnail keeps far more than one colour per image.
    assert baselines["thumbnail_112x112"]["psnr"]["mean"] > baselines["mean_colour"]["psnr"]["mean"] + 5
    assert metrics["psnr_over_thumbnail"] == pytest.approx(
        metrics["psnr"]["mean"] - baselines["thumbnail_112x112"]["psnr"]["mean"])
    assert json.loads((tmp_path / "eval.json").read_text())["baselines"] == baselines


def test_reconstruct_refuses_an_unfinished_run_unless_it_is_named(tiny_config, tiny_images, tiny_features, tmp_path):
    import torch

    from conftest import photo, write_image
    from featinv.evaluation.reconstruct import reconstruct_images

    run = train_decoder(tiny_config, tiny_images, tiny_features, tmp_path / "run").best_checkpoint
    payload = torch.load(run, weights_only=False)
    payload.update(finished=False, epoch=1)
    torch.save(payload, run)
    image = write_image(tmp_path / "photo.png", photo(240, seed=3))
    with pytest.raises(CheckpointError, match="did not finish"):
        reconstruct_images([image], run, strict=True)
    (result,) = reconstruct_images([image], run, strict=False)
    assert result.psnr > 5
