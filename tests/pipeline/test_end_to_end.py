"""The whole pipeline under DVC, as a user drives it, on a tiny config.

Copies the project into a fresh git repo, runs `dvc repro`, then
`dvc exp run -S decoder=...` and checks that no extract stage re-ran and that
`dvc metrics diff` reports PSNR.
"""

import json
import shutil

import pytest

from dvc_project import make_project, run_cmd

pytestmark = pytest.mark.slow


def _tiny(params: dict) -> None:
    params["taps"] = ["vgg16/block1"]
    params["encoder"] = "vgg16/block1"
    params["data"].update(max_images=8, train_views=1)
    params["train"].update(epochs=1)
    params["evaluate"].update(grid_images=2)


def test_repro_then_experiment_reuses_every_feature_store(tmp_path):
    env = make_project(tmp_path, _tiny)
    out = run_cmd(["dvc", "repro"], tmp_path, env)
    assert "Running stage 'extract@vgg16/block1'" in out
    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert metrics["psnr"]["mean"] > 5 and metrics["n_images"] > 0
    assert (tmp_path / "metrics" / "reconstructions.png").stat().st_size > 10_000
    assert (tmp_path / "metrics" / "train" / "plots" / "metrics" / "val" / "psnr.tsv").is_file()
    run_cmd(["git", "add", "-A"], tmp_path, env)
    run_cmd(["git", "commit", "-qm", "baseline"], tmp_path, env)

    # An interrupted extraction leaves <store>.partial beside the stores (the next run resumes it):
    # not part of the record, so the stages that depend on data/features stay up to date.
    stray = tmp_path / "data" / "features" / "vgg16" / "block3.zarr.partial"
    stray.mkdir(parents=True)
    (stray / "zarr.json").write_text("{}")
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "status", "dvc.yaml"], tmp_path, env)
    shutil.rmtree(stray)

    out = run_cmd(["dvc", "exp", "run", "-S", "decoder=transposed_conv", "-S", "train.epochs=2"], tmp_path, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'extract" not in out and "Running stage 'prepare'" not in out

    changed = json.loads(run_cmd(["dvc", "metrics", "diff", "--json"], tmp_path, env, stdout_only=True))
    assert any("psnr.mean" in key for keys in changed.values() for key in keys)
