"""Helpers for the DVC end-to-end tests: a throwaway copy of the project in its own git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COPY = ["dvc.yaml", "params.yaml", "featinv", "pipeline", "study/dvc.yaml", ".dvc/config", ".gitignore", ".dvcignore"]


def run_cmd(args: list[str], cwd: Path, env: dict, stdout_only: bool = False) -> str:
    """Run a command; fail the test with its output when it fails.

    ``stdout_only`` for machine-readable output (DVC warns on stderr, e.g. about metrics
    files of stages that have not run).
    """
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def make_project(root: Path, edit_params: Callable[[dict], None]) -> dict:
    """Copy the project into ``root`` (a fresh git + DVC repo) with edited params; return the env."""
    for name in COPY:
        src = REPO / name
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit_params(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(root), DVC_NO_ANALYTICS="1")
    run_cmd(["git", "init", "-q"], root, env)
    run_cmd(["git", "config", "user.email", "ci@featinv"], root, env)
    run_cmd(["git", "config", "user.name", "featinv ci"], root, env)
    config = (root / ".dvc" / "config").read_text()
    shutil.rmtree(root / ".dvc")
    run_cmd(["dvc", "init", "-q"], root, env)
    (root / ".dvc" / "config").write_text(config)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "init"], root, env)
    return env
