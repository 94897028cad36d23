"""The whole pipeline under DVC, as a user drives it, on a tiny config.

Copies the project into a fresh git repo, runs `dvc repro`, then
`dvc exp run -S decoder=...` and checks that no extract stage re-ran and that
`dvc metrics diff` reports PSNR.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

COPY = ["dvc.yaml", "params.yaml", "featinv", "pipeline", ".dvc/config", ".dvcignore", ".gitignore"]


def _run(args, cwd, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["taps"] = ["vgg16/block1"]
    params["data"].update(max_images=8, train_views=1)
    params["train"].update(epochs=1)
    params["evaluate"].update(grid_images=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(root), DVC_NO_ANALYTICS="1")
    _run(["git", "init", "-q"], root, env)
    _run(["git", "config", "user.email", "ci@featinv"], root, env)
    _run(["git", "config", "user.name", "featinv ci"], root, env)
    _run(["dvc", "init", "-q", "--force"], root, env)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env


def test_repro_then_experiment_reuses_every_feature_store(project):
    root, env = project
    out = _run(["dvc", "repro"], root, env)
    assert "Running stage 'extract@vgg16/block1'" in out
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert metrics["psnr"]["mean"] > 5 and metrics["n_images"] > 0
    assert (root / "metrics" / "reconstructions.png").stat().st_size > 10_000
    assert (root / "metrics" / "train" / "plots" / "metrics" / "val" / "psnr.tsv").is_file()
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)

    out = _run(["dvc", "exp", "run", "-S", "decoder=transposed_conv", "-S", "train.epochs=2"], root, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'extract" not in out and "Running stage 'prepare'" not in out

    diff = _run(["dvc", "metrics", "diff", "--json"], root, env)
    changed = json.loads(diff)
    assert any("psnr.mean" in key for keys in changed.values() for key in keys)
