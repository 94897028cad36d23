"""The featinv command, driven in-process."""

import json

import pytest
from typer.testing import CliRunner

from featinv.cli import app
from featinv.config import Config, with_overrides
from featinv.presets import PRESETS, preset_overrides

runner = CliRunner()


def test_taps_json_lists_the_study_taps_and_all_five_vgg16_blocks():
    result = runner.invoke(app, ["taps", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {"tap": "vgg16/block1", "shape": [64, 112, 112]} in rows
    assert {"tap": "vgg16/block5", "shape": [512, 7, 7]} in rows
    assert len(rows) == 11


def test_decoders_json_reports_parameter_counts():
    result = runner.invoke(app, ["decoders", "--json", "--tap", "vgg16/block1"])
    assert result.exit_code == 0
    rows = {r["decoder"]: r["params"] for r in json.loads(result.stdout)}
    assert rows["transposed_conv"] == 33731  # the published 34K-parameter decoder


def test_paper_preset():
    result = runner.invoke(app, ["preset", "paper", "--json"])
    preset = json.loads(result.stdout)
    assert preset["train.loss.lpips"] == 0.5 and preset["data.source"] == "div2k"
    assert preset["extract.weights"] == "imagenet" and preset["train.epochs"] == 30
    assert preset["extract.normalisation"] == "imagenet"  # the published study's, for every encoder


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_set_of_params(name):
    result = runner.invoke(app, ["preset", name])
    assert result.exit_code == 0
    overrides = [item for item in result.stdout.split() if item != "-S"]
    cfg = with_overrides(Config(), overrides)  # what `dvc exp run -S ...` would write, re-validated
    assert cfg.train.epochs == 30


def test_local_mlp_preset_trains_on_single_position_windows():
    cfg = with_overrides(Config(), preset_overrides("local_mlp"))
    assert cfg.decoder == "local_mlp" and cfg.train.feature_crop == 1 and cfg.train.loss.lpips == 0


def test_errors_are_one_line_and_nonzero(tmp_path):
    result = runner.invoke(app, ["preset", "nope"])
    assert result.exit_code == 1 and "valid choices: paper, local_mlp" in result.output
    result = runner.invoke(app, ["train", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "params file not found" in result.output
    assert "Traceback" not in result.output


def test_errors_are_one_unwrapped_line_when_stderr_is_not_a_terminal(tmp_path):
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  batch_size: 4\n")
    proc = subprocess.run([sys.executable, "-m", "featinv.cli", "extract", "--params", str(params),
                           "--tap", "vgg16/block1", "--images", str(tmp_path / "images.zarr"),
                           "--set", "train.device=" + "a" * 120],
                          capture_output=True, text=True, env={"COLUMNS": "40", "PATH": ""})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "train.device" in lines[0] and "a" * 120 in lines[0]
