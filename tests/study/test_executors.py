"""Study executors: planning from DVC's DAG, lock entries, project snapshots, reports (no DVC run here)."""

import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from featinv.cli import app
from featinv.errors import ParamsError, UnknownNameError
from featinv.study.executors import EXECUTORS, StageFailedError, StageOutcome, StudyReport, StudyRequest
from featinv.study.executors.dvc_cli import lock_location, plan_stages, read_lock_entry, stage_wdir, write_lock_entries
from featinv.study.executors.snapshot import materialize, take_snapshot

S = "study/dvc.yaml"
NODES = ["prepare", "extract@a", "extract@b", f"{S}:run@a-x", f"{S}:run@b-x", f"{S}:ensemble@w-x", f"{S}:leaderboard"]
EDGES = [("prepare", "extract@a"), ("prepare", "extract@b"), ("prepare", f"{S}:run@a-x"), ("prepare", f"{S}:run@b-x"),
         ("extract@a", f"{S}:run@a-x"), ("extract@b", f"{S}:run@b-x"), ("extract@a", f"{S}:ensemble@w-x"),
         ("extract@b", f"{S}:ensemble@w-x"), (f"{S}:run@a-x", f"{S}:leaderboard"),
         (f"{S}:run@b-x", f"{S}:leaderboard"), (f"{S}:ensemble@w-x", f"{S}:leaderboard")]


def test_plan_runs_everything_downstream_of_a_changed_stage_and_keeps_the_leaderboard_on_the_client():
    plan = plan_stages(list(reversed(NODES)), EDGES, {"extract@b"}, {f"{S}:leaderboard"})
    assert plan.to_run == {"extract@b", f"{S}:run@b-x", f"{S}:ensemble@w-x", f"{S}:leaderboard"}
    assert plan.distributed[0] == "extract@b" and set(plan.distributed) == plan.to_run - {f"{S}:leaderboard"}
    assert plan.order.index("prepare") < plan.order.index("extract@a") < plan.order.index(f"{S}:ensemble@w-x")
    assert plan.parents[f"{S}:run@b-x"] == ("prepare", "extract@b")
    assert plan_stages(NODES, EDGES, set()).to_run == frozenset()


def test_lock_entries_go_to_the_lock_file_beside_their_dvc_yaml(tmp_path):
    assert lock_location(f"{S}:run@vgg16/block1-wavelet") == ("study/dvc.lock", "run@vgg16/block1-wavelet")
    assert lock_location("extract@vgg16/block1") == ("dvc.lock", "extract@vgg16/block1")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {"cmd": "old"}}}))
    write_lock_entries(tmp_path, {"extract@a": {"cmd": "e"}, f"{S}:run@a-x": {"cmd": "r"}})
    assert read_lock_entry(tmp_path, "prepare") == {"cmd": "old"}  # other entries are kept
    assert read_lock_entry(tmp_path, "extract@a") == {"cmd": "e"}
    assert yaml.safe_load((tmp_path / "study" / "dvc.lock").read_text())["schema"] == "2.0"
    assert read_lock_entry(tmp_path, f"{S}:run@a-x") == {"cmd": "r"}
    assert not list(tmp_path.rglob(".dvc.lock.*"))  # written through a temporary file, replaced atomically


def test_stage_paths_are_relative_to_the_stage_wdir():
    assert stage_wdir(REPO, f"{S}:run@vgg16/block1-wavelet") == REPO  # study/dvc.yaml stages use wdir: ..
    assert stage_wdir(REPO, "extract@vgg16/block1") == REPO


def _git(args, cwd):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_snapshot_carries_the_revision_and_every_uncommitted_change(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("a = 1\n")
    (src / "gone.txt").write_text("x")
    (src / ".gitignore").write_text("data/\n")
    _git(["init", "-q"], src)
    _git(["add", "-A"], src)
    _git(["commit", "-qm", "init"], src)
    (src / "pkg" / "a.py").write_text("a = 2\n")  # modified
    (src / "new.yaml").write_text("n: 1\n")  # untracked
    (src / "gone.txt").unlink()  # deleted
    (src / "data").mkdir()
    (src / "data" / "big.bin").write_bytes(b"0" * 1000)  # ignored: never travels
    snap = take_snapshot(src)
    assert set(snap.overlay) == {"pkg/a.py", "new.yaml", "gone.txt"} and snap.overlay["gone.txt"] is None
    (tmp_path / "work").mkdir()
    dest = materialize(snap, tmp_path / "work" / "clone")
    assert (dest / "pkg" / "a.py").read_text() == "a = 2\n" and (dest / "new.yaml").is_file()
    assert not (dest / "gone.txt").exists() and not (dest / "data").exists()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True).stdout.strip()
    assert head == snap.revision


def test_stage_failures_survive_pickling_with_their_log():
    import pickle

    log = ("$ dvc repro --single-item --pull extract@a\nRunning stage 'extract@a':\n> python -m pipeline.extract\n"
           "error: data/prepared/images.zarr is not a featinv store\n"
           "ERROR: failed to reproduce 'extract@a': failed to run: python -m pipeline.extract, exited with 1\n\n"
           "ClusterError: `dvc repro --single-item --pull extract@a` exited with status 255\n")
    err = pickle.loads(pickle.dumps(StageFailedError("extract@a", "1", log)))
    assert (err.stage, err.worker, err.log) == ("extract@a", "1", log)
    assert str(err) == ("extract@a failed on worker 1: error: data/prepared/images.zarr is not a featinv store "
                        "(the stage command exited with 1)")
    assert StageFailedError("x", "0", "$ dvc pull\nERROR: failed to pull data from the cloud\nboom\n").reason == \
        "ERROR: failed to pull data from the cloud"


def test_report_says_what_ran_where():
    report = StudyReport("dask", [StageOutcome("extract@a", "0", "ran"), StageOutcome(f"{S}:run@a-x", "1", "ran"),
                                  StageOutcome(f"{S}:run@b-x", "1", "restored"),
                                  StageOutcome(f"{S}:leaderboard", "client", "ran")], workers=2)
    first, where = report.summary_lines(3)
    assert "ran 1 training runs and 1 extractions (a×1)" in first
    assert where == ("dask on 2 workers — worker 0: 1 extractions · worker 1: 1 training runs (+1 restored from the "
                     "run-cache or remote) · client: 1 leaderboard")


def test_executors_are_a_registry_and_local_refuses_cluster_options(tmp_path):
    assert EXECUTORS.names() == ["local", "dask"]
    with pytest.raises(UnknownNameError, match="valid choices: local, dask"):
        EXECUTORS.get("slurm")
    with pytest.raises(ParamsError, match="--workers, --remote only apply to --executor dask"):
        EXECUTORS.get("local")(StudyRequest(root=tmp_path, target=S, workers=2, remote="s3"))


def test_cli_study_rejects_workers_with_address_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["study", "--executor", "dask", "--workers", "2", "--address", "tcp://x:1"])
    assert result.exit_code == 1 and "pass one of them" in result.output
    result = CliRunner().invoke(app, ["study", "--executor", "spark"])
    assert result.exit_code == 1 and "unknown executor 'spark'" in result.output


def test_dvcignore_keeps_bytecode_out_of_code_dependency_hashes():
    # featinv/decoders is a directory dep: __pycache__ in it would give each machine its own hash.
    lines = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in lines and "*.pyc" in lines

