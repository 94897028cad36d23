"""The featinv command, driven in-process."""

import json

from typer.testing import CliRunner

from featinv.cli import app

runner = CliRunner()


def test_taps_json_lists_the_eight_study_taps():
    result = runner.invoke(app, ["taps", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {"tap": "vgg16/block1", "shape": [64, 112, 112]} in rows
    assert len(rows) == 8


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


def test_errors_are_one_line_and_nonzero(tmp_path):
    result = runner.invoke(app, ["preset", "nope"])
    assert result.exit_code == 1 and "valid choices: paper" in result.output
    result = runner.invoke(app, ["train", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "params file not found" in result.output
    assert "Traceback" not in result.output
