"""The study grid, its leaderboard and figures."""

import json

import pandas as pd
import pytest

from featinv.config import load_params
from featinv.study.grid import StudyRun, plan_runs
from featinv.study.leaderboard import depth_figure, leaderboard, write_leaderboard

from featinv.presets import preset_overrides

from conftest import REPO


PUBLISHED_GRID = preset_overrides("published_study")


def test_the_default_study_is_8_taps_by_2_decoders_at_a_real_budget():
    cfg = load_params(REPO / "params.yaml")
    runs = plan_runs(cfg)
    assert len(runs) == 16 and len({r.to_dict().__repr__() for r in runs}) == 16
    assert cfg.study.epochs * cfg.study.samples_per_epoch == 1024


def test_the_published_grid_is_44_distinct_runs():
    from featinv.config import with_overrides

    runs = plan_runs(with_overrides(load_params(REPO / "params.yaml"), PUBLISHED_GRID))
    assert len(runs) == 44 and len({r.to_dict().__repr__() for r in runs}) == 44
    assert sum(r.encoder == "ensemble" for r in runs) == 12
    assert {r.fusion for r in runs} == {None, "weighted", "concat", "attention"}
    assert len({r.encoder for r in runs if r.fusion is None}) == 8


def test_study_list_json_via_cli():
    from typer.testing import CliRunner

    from featinv.cli import app

    result = CliRunner().invoke(app, ["study", "--list", "--json", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0
    runs = json.loads(result.stdout)
    assert len(runs) == 16 and len({json.dumps(r, sort_keys=True) for r in runs}) == 16
    assert set(runs[0]) == {"encoder", "fusion", "decoder"}


def _scores(psnr, ssim, grid=None):
    return {"psnr": {"mean": psnr}, "ssim": {"mean": ssim}, "grid": grid}


def _results():
    block3_baselines = {"mean_colour": _scores(12.7, 0.3, [28, 28]), "thumbnail_28x28": _scores(26.0, 0.75, [28, 28])}
    return pd.DataFrame([
        {"tap_or_fusion": "vgg16/block1", "decoder": "a", "psnr": 20.0, "ssim": 0.6, "lpips": None,
         "decoder_params": 10, "train_seconds": 3.0, "samples_seen": 128, "still_improving": True,
         "weights": "random:seed=0", "baselines": {}, "thumbnail_psnr": None, "psnr_over_thumbnail": None},
        {"tap_or_fusion": "ensemble-concat", "decoder": "a", "psnr": 25.0, "ssim": 0.7, "lpips": None,
         "decoder_params": 20, "train_seconds": 4.0, "samples_seen": 128, "still_improving": False,
         "weights": "random:seed=0", "baselines": {}, "thumbnail_psnr": None, "psnr_over_thumbnail": None},
        {"tap_or_fusion": "vgg16/block3", "decoder": "b", "psnr": 25.0, "ssim": 0.8, "lpips": 0.3,
         "decoder_params": 30, "train_seconds": 5.0, "samples_seen": 128, "still_improving": False,
         "weights": "random:seed=0", "baselines": block3_baselines, "thumbnail_psnr": 26.0,
         "psnr_over_thumbnail": -1.0},
    ])


def test_leaderboard_ranks_runs_by_psnr_then_ssim_among_their_baselines(tmp_path):
    board = leaderboard(_results())
    assert list(board["rank"]) == [0, 1, 2, 3, 0]
    assert list(board["decoder"]) == ["baseline: thumbnail_28x28", "b", "a", "a", "baseline: mean_colour"]
    assert list(board["tap_or_fusion"])[1:4] == ["vgg16/block3", "ensemble-concat", "vgg16/block1"]
    csv_path, md_path = write_leaderboard(board, tmp_path)
    assert len(pd.read_csv(csv_path)) == 5
    md = md_path.read_text()
    assert "| 1 | vgg16/block3 | b | 25.00 | -1.00 | 0.800 | 0.300 | random:seed=0 | 30 | 128 | 5 |" in md
    assert "| — | vgg16/block3 | baseline: thumbnail_28x28 | 26.00 | +0.00 | 0.750 |  |  |" in md  # no weights
    assert "| 3 | vgg16/block1 | a ↑ |" in md and "1 of 3" in md  # still improving, flagged
    assert "Budget per run: 128 samples seen, 3–5 s of training" in md


def test_taps_with_the_same_baseline_share_one_row():
    results = _results()
    twin = dict(results.iloc[2], tap_or_fusion="resnet34/layer2", decoder="c", psnr=24.0)  # same 28×28 grid
    other = dict(results.iloc[2], tap_or_fusion="vit_small/block1", decoder="d", thumbnail_psnr=23.0,
                 baselines={"mean_colour": _scores(12.7, 0.3, [14, 14]), "thumbnail_14x14": _scores(23.0, 0.6)})
    board = leaderboard(pd.concat([results, pd.DataFrame([twin, other])], ignore_index=True))
    base = board[board["rank"] == 0].set_index(["tap_or_fusion", "decoder"])
    assert base.loc[("vgg16/block3, resnet34/layer2", "baseline: thumbnail_28x28"), "psnr_over_thumbnail"] == 0
    assert base.loc[("vit_small/block1", "baseline: thumbnail_14x14"), "psnr"] == 23.0
    # The mean colour does not depend on the grid: one row, without a margin over a thumbnail.
    assert pd.isna(base.loc[("every tap", "baseline: mean_colour"), "psnr_over_thumbnail"])
    assert len(base) == 3


def test_depth_figure_orders_taps_by_depth(tmp_path):
    out = depth_figure([{"tap": "vgg16/block3", "psnr_decoder": 18.0, "psnr_refined": 21.0, "thumbnail": 20.9},
                        {"tap": "vgg16/block1", "psnr_decoder": 30.0, "psnr_refined": None}], tmp_path / "f.png")
    assert out.stat().st_size > 5000


def test_run_labels():
    assert StudyRun("ensemble", "concat", "wavelet").label == "ensemble-concat"
    assert StudyRun("vgg16/block1", None, "wavelet").label == "vgg16/block1"
