"""`featinv study --executor dask`: Dask workers, a DVC remote on S3, and DVC as the record.

Everything stays on this machine: the S3 server is moto's ThreadedMotoServer bound to
127.0.0.1, the Dask cluster is a LocalCluster of 2 workers on 127.0.0.1.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from dvc_project import REPO, make_project, run_cmd

distributed = pytest.importorskip("distributed")
pytest.importorskip("dvc_s3")
moto_server = pytest.importorskip("moto.server")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

TAPS = ["vgg16/block1", "resnet34/layer1"]
DECODERS = ["transposed_conv", "wavelet"]
BUCKET = "featinv-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 (nowhere else) with one bucket; yields its endpoint and the AWS environment."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    endpoint = f"http://127.0.0.1:{port}"
    # Fake credentials in the environment: boto takes them first and never asks instance metadata.
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint, env
    server.stop()


def _with_remote(root: Path, env: dict, s3, prefix: str) -> dict:
    """Point the project's default DVC remote at the test bucket (committed: workers clone the project)."""
    endpoint, aws = s3
    env = dict(env, **aws, OMP_NUM_THREADS="1",  # one thread everywhere: CPU float sums in the same order
               DASK_TEMPORARY_DIRECTORY=str(root.parent / f"{root.name}-dask"), DVC_NO_ANALYTICS="1")
    (root / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    run_cmd(["dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/{prefix}"], root, env)
    run_cmd(["dvc", "remote", "modify", "storage", "endpointurl", endpoint], root, env)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "remote"], root, env)
    return env


def _tiny(params: dict) -> None:
    params["taps"] = TAPS
    params["data"].update(max_images=6, train_views=1)
    params["study"].update(taps=TAPS, decoders=DECODERS, fusions=[], epochs=1, samples_per_epoch=4)
    params["study"].setdefault("max_minutes", None)  # params that dvc.yaml lists, in case params.yaml lags behind
    params["extract"].setdefault("normalisation", "auto")
    params["evaluate"].update(grid_images=1)


def _metrics(root: Path) -> dict:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted((root / "metrics/study").rglob("*.json"))}


def _status(root: Path, env: dict, *targets: str) -> dict:
    return json.loads(run_cmd(["dvc", "status", "--json", *targets], root, env, stdout_only=True) or "{}")


def _kill_the_worker_of_a_stage(cli: subprocess.Popen, marker: str, killed: list, timeout: float) -> None:
    """Wait for a stage command (``marker`` in its command line); SIGKILL the Dask worker process above it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and cli.poll() is None:
        for proc in psutil.Process(cli.pid).children(recursive=True):
            try:
                if marker not in " ".join(proc.cmdline()):
                    continue
                worker = proc
                while worker.ppid() != cli.pid:  # the worker is the CLI's child (the nanny lives in the CLI)
                    worker = worker.parent()
                time.sleep(3)  # well into the stage
                worker.kill()
                killed.append(proc)
                return
            except (psutil.Error, AttributeError):
                continue
        time.sleep(0.2)


def test_dask_study_equals_the_sequential_one_and_survives_a_killed_worker(tmp_path, s3):
    seq = tmp_path / "sequential"
    seq_env = _with_remote(seq, make_project(seq, _tiny), s3, "sequential")
    run_cmd([sys.executable, "-m", "featinv.cli", "study"], seq, seq_env)

    dist = tmp_path / "distributed"
    env = _with_remote(dist, make_project(dist, _tiny), s3, "distributed")
    cli = subprocess.Popen([sys.executable, "-m", "featinv.cli", "study", "--executor", "dask", "--workers", "2"],
                           cwd=dist, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: list = []
    killer = threading.Thread(target=_kill_the_worker_of_a_stage, args=(cli, "pipeline.study_run", killed, 400))
    killer.start()
    log, _ = cli.communicate(timeout=600)
    killer.join()
    assert cli.returncode == 0, log[-4000:]
    assert killed, "no worker was killed mid-stage"
    killed[0].wait(timeout=10)  # the killed worker's stage died with it (the guard), it did not run on as an orphan

    # The result is the sequential one: same metrics (same seeds, one thread), same lock entries' outputs.
    seq_metrics, dist_metrics = _metrics(seq), _metrics(dist)
    assert len(dist_metrics) == len(TAPS) * len(DECODERS) and dist_metrics.keys() == seq_metrics.keys()
    for name, m in dist_metrics.items():
        for key in ("psnr", "ssim"):
            assert m[key]["mean"] == seq_metrics[name][key]["mean"], (name, key)
    assert (dist / "metrics/study/vgg16/block1/wavelet.csv").read_text() == \
        (seq / "metrics/study/vgg16/block1/wavelet.csv").read_text()
    for lock in ("dvc.lock", "study/dvc.lock"):
        seq_lock, dist_lock = (yaml.safe_load((r / lock).read_text())["stages"] for r in (seq, dist))
        assert dist_lock.keys() == seq_lock.keys()
        for stage in seq_lock:  # a run's checkpoint differs (timings inside); the stores do not
            if stage.startswith(("prepare", "extract@")):
                assert dist_lock[stage]["outs"] == seq_lock[stage]["outs"], stage

    # DVC's view on the client: the study is clean, every run's metrics are there, the leaderboard is written.
    assert _status(dist, env, "--with-deps", "study/dvc.yaml") == {}
    assert _status(dist, env).keys() == _status(seq, seq_env).keys()  # (the root train/evaluate: as sequential)
    shown = json.loads(run_cmd(["dvc", "metrics", "show", "--json"], dist, env, stdout_only=True))
    files = {f for rev in shown.values() for f in rev.get("data", {})}
    assert sum(f.startswith("metrics/study/") for f in files) == len(TAPS) * len(DECODERS)
    assert len((dist / "study/results/leaderboard.csv").read_text().splitlines()) >= 1 + len(TAPS) * len(DECODERS)
    assert (dist / "study/results/best_runs.png").is_file() and (dist / "study/results/psnr_by_tap.png").is_file()
    summary = re.search(r"study: 4 runs planned; ran (\d+) training runs and (\d+) extractions", log)
    assert summary and summary.groups() == ("4", "2"), log[-3000:]
    assert "dask on 2 workers" in log and "client: 1 leaderboard" in log
    assert not re.search(r"Running stage '(extract@|study/dvc.yaml:run)", log)  # the client recomputed nothing

    again = run_cmd([sys.executable, "-m", "featinv.cli", "study", "--executor", "dask", "--workers", "2"], dist, env)
    assert "ran 0 training runs and 0 extractions" in again and "no stage needed a worker" in again
    assert "Running stage" not in again


# --- a stage that fails every time, on a toy pipeline of shell commands (fast) -----------------------------------

TOY_ROOT = """\
stages:
  prepare:
    cmd: mkdir -p data && cp in.txt data/prepared.txt
    deps: [in.txt]
    outs: [data/prepared.txt]
  extract:
    foreach: [a]
    do:
      cmd: mkdir -p data/features && (cat data/prepared.txt; echo ${item}) > data/features/${item}.txt
      deps: [data/prepared.txt]
      outs:
        - data/features/${item}.txt
"""
TOY_STUDY = """\
stages:
  run:
    matrix:
      tap: [a]
      decoder: [good, bad]
    wdir: ..
    cmd: >-
      if [ ${item.decoder} != good ]; then echo "decoder ${item.decoder} exploded"; exit 3; fi;
      mkdir -p data/study/${item.tap} metrics/study/${item.tap}
      && cat data/features/${item.tap}.txt > data/study/${item.tap}/${item.decoder}.txt
      && echo '{"psnr": 1}' > metrics/study/${item.tap}/${item.decoder}.json
      && echo per-image > metrics/study/${item.tap}/${item.decoder}.csv
    deps:
      - data/prepared.txt
      - data/features/${item.tap}.txt
    outs:
      - data/study/${item.tap}/${item.decoder}.txt
      - metrics/study/${item.tap}/${item.decoder}.csv:
          cache: false
    metrics:
      - metrics/study/${item.tap}/${item.decoder}.json:
          cache: false
  leaderboard:
    wdir: ..
    cmd: cat metrics/study/*/*.json > board.txt
    deps: [metrics/study]
    outs:
      - board.txt:
          cache: false
"""


def test_a_stage_failing_on_every_try_is_reported_with_its_log_and_the_others_finish(tmp_path, s3, monkeypatch):
    from featinv.study.executors import StudyRequest
    from featinv.study.executors.dask import run_dask

    root = tmp_path / "toy"
    (root / "study").mkdir(parents=True)
    (root / "in.txt").write_text("pixels\n")
    (root / "dvc.yaml").write_text(TOY_ROOT)
    (root / "study" / "dvc.yaml").write_text(TOY_STUDY)
    # `dvc` and the stages' `python` are this interpreter's, whether or not its venv is activated.
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run_cmd(["git", "init", "-q"], root, env)
    run_cmd(["git", "config", "user.email", "ci@featinv"], root, env)
    run_cmd(["git", "config", "user.name", "featinv ci"], root, env)
    run_cmd(["dvc", "init", "-q"], root, env)
    env = _with_remote(root, env, s3, "toy")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(root)
    events = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                                  host="127.0.0.1",
                                  dashboard_address=None, local_directory=str(tmp_path / "dask")) as cluster:
        report = run_dask(StudyRequest(root=root, target="study/dvc.yaml",
                                       client_stages=frozenset({"study/dvc.yaml:leaderboard"}),
                                       address=cluster.scheduler_address, retries=1, on_event=events.append))

    bad = {"study/dvc.yaml:run@a-bad"}
    assert report.failed.keys() == bad
    for stage in bad:
        assert "decoder bad exploded (the stage command exited with 3)" in report.failed[stage]
        log = root / "data/logs/study" / (stage.replace("/", "_").replace(":", "_") + ".log")
        assert "decoder bad exploded" in log.read_text() and str(log.relative_to(root)) in report.failed[stage]
    assert sum(e.kind == "failed" for e in events) == 2  # both tries: retries=1
    # The others finished and are recorded on the client; nothing of the failed ones is.
    assert sorted(o.stage for o in report.outcomes) == ["extract@a", "prepare", "study/dvc.yaml:run@a-good"]
    assert (root / "metrics/study/a/good.json").is_file() and not (root / "metrics/study/a/bad.json").exists()
    lock = yaml.safe_load((root / "study/dvc.lock").read_text())["stages"]
    assert set(lock) == {"run@a-good"}
    assert not (root / "board.txt").exists()  # the leaderboard waits for every run, as in a sequential repro
    assert set(_status(root, env, "--with-deps", "study/dvc.yaml")) == bad | {"study/dvc.yaml:leaderboard"}
