"""The ``dask`` executor: a study's DVC stages as Dask tasks on many workers; DVC's remote carries the data.

DVC cannot run the stages of one workspace in parallel (every ``dvc repro``
holds the repository lock), so each stage runs in a workspace of its own:

1. **Plan** (client). ``dvc dag`` and ``dvc status`` give what a sequential
   ``dvc repro`` would run: changed stages and everything downstream of them.
   Every one of them except the client's own (the leaderboard) becomes one Dask
   task (``prepare``, ``extract@<tap>``, ``run@…``/``ensemble@…``), depending
   on the tasks of its DVC parents.  Data the workers read but nobody
   recomputes is pushed to the remote first.
2. **Run** (worker). The task clones the client's git revision from a bundle
   and applies its uncommitted changes (:mod:`featinv.study.executors.snapshot`),
   records its parents' lock entries, ``dvc pull``\\ s its parents' outputs,
   runs the stage's own command with ``dvc repro --single-item --pull <stage>``
   (DVC restores it from the run-cache instead where it can), then
   ``dvc push``\\ es the outputs and only after them the run-cache, and returns
   the stage's lock entry and its uncached outputs (metrics JSON, per-image CSV).
   Tasks carry a ``GPU: 1`` resource where the workers have GPUs; a failing
   stage is tried again (``retries``), a task whose worker dies is rescheduled
   by Dask on another worker.
3. **Record** (client). As each task finishes, its uncached outputs and its
   lock entry are written into the client's workspace (atomically); at the end
   one ``dvc pull`` fetches the cached outputs and one ``dvc repro`` of the
   study finds every stage up to date and runs the leaderboard, exactly as after
   a sequential ``featinv study``.

Why lock entries and not the run-cache alone: DVC (3.x) keeps no run-cache entry
for a stage with an uncached plain output (``dvc/stage/__init__.py``: ``run_cache=
not no_cache_outs``, treeverse/dvc#8738), which is every study run (its per-image
CSV), and ``dvc push`` never uploads uncached outputs (metrics), so a run-cache
entry could not be restored on the client anyway.  The run-cache is still pushed
and pulled, so extractions are restored rather than recomputed wherever DVC can.

Nothing half-written goes anywhere: a worker pushes only after ``dvc repro``
succeeded, objects before run-cache entries, and a lock entry reaches the client
only as the result of a finished task.  A stage runs under
:mod:`featinv.study.executors.guard`, so a killed worker takes its stage down with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from featinv.study.executors import guard
from featinv.study.executors.base import (
    EXECUTORS,
    ClusterError,
    StageEvent,
    StageFailedError,
    StageOutcome,
    StudyReport,
    StudyRequest,
)
from featinv.study.executors.dvc_cli import (
    RESTORED,
    RUNNING,
    StagePlan,
    changed_stages,
    dvc_env,
    lock_location,
    plan_stages,
    read_dag,
    read_lock_entry,
    repro_streaming,
    run_dvc,
    stage_wdir,
    write_lock_entries,
)
from featinv.study.executors.snapshot import ProjectSnapshot, materialize, take_snapshot

__all__ = ["run_dask", "reproduce_stage", "StageJob", "StageResult", "LOG_DIR", "TOPIC"]

TOPIC = "featinv-study"  # Dask event topic: workers report start / done / failed tries
LOG_DIR = Path("data/logs/study")  # one log per stage on the client (data/ is git-ignored, no stage reads it)
CACHE_DIRNAME = "featinv-dvc-cache"  # DVC cache shared by the workers of one host (next to their scratch dirs)
WAIT_FOR_WORKERS_S = 600


@dataclasses.dataclass(frozen=True)
class StageJob:
    """One stage for a worker: what to pull first, where to push, and the stage's environment."""

    stage: str
    parents: tuple[str, ...]  # every DVC parent: their outputs are pulled before the stage runs
    remote: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    gpu_of_worker: dict[str, str] = dataclasses.field(default_factory=dict)  # LocalCluster: worker → CUDA device


@dataclasses.dataclass(frozen=True)
class StageResult:
    """A stage done on a worker: its lock entry, its uncached outputs (path → bytes) and where it ran."""

    stage: str
    lock_entry: dict
    files: dict[str, bytes]
    worker: str
    action: str  # ran | restored (run-cache) | pulled (already up to date)
    seconds: float
    log: str


# --- worker side -----------------------------------------------------------------------------------------------

def reproduce_stage(job: StageJob, snapshot: ProjectSnapshot, *upstream: StageResult) -> StageResult:
    """The Dask task: reproduce one stage in a throwaway clone, push what it made, return its record.

    Raises:
        StageFailedError: any step failed; it carries the whole log of this try.
    """
    from distributed import get_worker

    worker = get_worker()
    name = str(worker.name)
    # (the scheduler overwrites an event's "worker" with the worker's address: send the name as "who")
    worker.log_event(TOPIC, {"kind": "start", "stage": job.stage, "who": name})
    start, log = time.monotonic(), []
    scratch = Path(worker.local_directory)
    try:
        with tempfile.TemporaryDirectory(prefix="featinv-stage-", dir=scratch) as tmp:
            result = _reproduce_in_clone(job, snapshot, upstream, Path(tmp) / "project",
                                         scratch.parent / CACHE_DIRNAME, name, log)
    except Exception as exc:  # noqa: BLE001 - every failure of a try becomes one StageFailedError with its log
        error = StageFailedError(job.stage, name, "".join(log) + f"\n{type(exc).__name__}: {exc}\n")
        worker.log_event(TOPIC, {"kind": "failed", "stage": job.stage, "who": name, "detail": error.reason})
        raise error from None
    result = dataclasses.replace(result, seconds=time.monotonic() - start)
    worker.log_event(TOPIC, {"kind": "done", "stage": job.stage, "who": name,
                             "detail": f"{result.action} in {result.seconds:.0f} s"})
    return result


def _reproduce_in_clone(job: StageJob, snapshot: ProjectSnapshot, upstream: tuple[StageResult, ...], dest: Path,
                        cache: Path, worker: str, log: list[str]) -> StageResult:
    clone = materialize(snapshot, dest)
    _configure_clone(clone, cache, job.remote)
    write_lock_entries(clone, {r.stage: r.lock_entry for r in upstream})
    # PYTHONDONTWRITEBYTECODE: no __pycache__ in the clone's code directories, which are stage deps.
    env = dvc_env({**job.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")])),
                   "PYTHONDONTWRITEBYTECODE": "1"})
    if worker in job.gpu_of_worker:
        env["CUDA_VISIBLE_DEVICES"] = job.gpu_of_worker[worker]

    def dvc(*args: str) -> str:
        log.append(f"$ dvc {' '.join(args)}\n")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, guard.__file__, sys.executable, "-m", "dvc", *args], cwd=clone,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.append(proc.stdout + f"[{time.monotonic() - start:.1f} s]\n")
        if proc.returncode != 0:
            raise ClusterError(f"`dvc {' '.join(args)}` exited with status {proc.returncode}")
        return proc.stdout

    if job.parents:
        dvc("pull", *job.parents)
    out = dvc("repro", "--single-item", "--pull", job.stage)
    dvc("push", job.stage)  # the outputs first…
    dvc("push", "--run-cache", job.stage)  # …then the run-cache entries that point at them
    entry = read_lock_entry(clone, job.stage)
    if entry is None:
        raise ClusterError(f"dvc recorded no lock entry for {job.stage}")
    action = "ran" if RUNNING.search(out) else "restored" if RESTORED.search(out) else "pulled"
    return StageResult(job.stage, entry, _uncached_outputs(clone, job.stage, entry), worker, action, 0.0, "".join(log))


def _configure_clone(clone: Path, cache: Path, remote: str) -> None:
    """The clone's own DVC settings (``.dvc/config.local``): the host's shared cache, the remote, no pings."""
    cache.mkdir(parents=True, exist_ok=True)
    (clone / ".dvc" / "config.local").write_text(
        "[core]\n"
        f"    remote = {remote}\n"
        f"    site_cache_dir = {clone / '.dvc' / 'tmp' / 'site'}\n"
        "    analytics = false\n"
        "    check_update = false\n"
        "[cache]\n"
        f"    dir = {cache}\n")


def _uncached_outputs(clone: Path, stage: str, entry: dict) -> dict[str, bytes]:
    """The stage's outputs that DVC does not cache (metrics, CSV): the files git sees under its outs.

    DVC git-ignores every output it caches; what git still sees under the outputs is what the
    client keeps in git, so it travels back with the result.
    """
    wdir = stage_wdir(clone, stage)
    outs = [str((wdir / o["path"]).relative_to(clone)) for o in entry.get("outs", [])]
    if not outs:
        return {}
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *outs],
                            cwd=clone, capture_output=True, check=True).stdout.split(b"\0")
    return {os.fsdecode(p): (clone / os.fsdecode(p)).read_bytes() for p in listed
            if p and (clone / os.fsdecode(p)).is_file()}


# --- client side -----------------------------------------------------------------------------------------------

@EXECUTORS.register("dask")
def run_dask(request: StudyRequest) -> StudyReport:
    """Run the study's stages on Dask workers, then record them on the client with one ``dvc repro``."""
    distributed = _import_distributed()
    root = request.root
    remote = _project_remote(root, request.remote)
    nodes, edges = read_dag(root, request.target)
    plan = plan_stages(nodes, edges, changed_stages(root, request.target), request.client_stages)
    report = StudyReport(executor="dask")
    done: dict[str, StageResult] = {}
    if plan.distributed:
        snapshot = take_snapshot(root)
        inputs = sorted({p for s in plan.distributed for p in plan.parents[s] if p not in plan.to_run})
        if inputs:  # what workers read but nobody recomputes: it must be on the remote
            run_dvc(["push", "-r", remote, *inputs], root)
        with _connect(request, distributed) as (client, env, gpu_of_worker):
            report.workers = len(client.scheduler_info()["workers"])
            done, report.failed = _run_on_cluster(client, distributed, plan, snapshot, request, remote, env,
                                                  gpu_of_worker)
        request.on_event(StageEvent("end", ""))
        report.outcomes += [StageOutcome(s, r.worker, r.action, r.seconds) for s, r in done.items()]
        if done:
            run_dvc(["pull", "-r", remote, *done], root)
            _autostage(root, sorted({lock_location(s)[0] for s in done}))
    targets = [request.target] if not report.failed else sorted(done)
    if targets:
        counts, code = repro_streaming(targets, root, request.echo)
        report.outcomes += [StageOutcome(s, "client", "ran") for s, n in counts.items() for _ in range(n)]
        if code != 0:
            raise ClusterError(f"the client's `dvc repro {' '.join(targets)}` failed (exit {code}); "
                               "see the output above")
    return report


def _run_on_cluster(client, distributed, plan: StagePlan, snapshot: ProjectSnapshot, request: StudyRequest,
                    remote: str, env: dict[str, str], gpu_of_worker: dict[str, str]
                    ) -> tuple[dict[str, StageResult], dict[str, str]]:
    """Submit one task per stage (parents first), record each result as it arrives; (done, failed)."""
    resources = {"GPU": 1} if any("GPU" in w.get("resources", {})
                                  for w in client.scheduler_info()["workers"].values()) else None
    client.subscribe_topic(TOPIC, lambda event: request.on_event(
        StageEvent(event[1]["kind"], event[1]["stage"], event[1]["who"], event[1].get("detail", ""))))
    run_id = uuid.uuid4().hex[:8]
    # A task, not scatter(): if the worker holding it dies, Dask recomputes it from the graph.
    snap = client.submit(_identity, snapshot, key=f"featinv-{run_id}-snapshot", pure=False)
    futures = {}
    for stage in plan.distributed:
        job = StageJob(stage, plan.parents[stage], remote, env, gpu_of_worker)
        ups = [futures[p] for p in plan.parents[stage] if p in futures]
        futures[stage] = client.submit(reproduce_stage, job, snap, *ups, key=f"featinv-{run_id}-{stage}",
                                       retries=request.retries, resources=resources, pure=False)
    stage_of = {f.key: s for s, f in futures.items()}
    done: dict[str, StageResult] = {}
    failed: dict[str, str] = {}
    try:
        for future in distributed.as_completed(list(futures.values())):
            stage = stage_of[future.key]
            if future.status == "finished":
                done[stage] = result = future.result()
                _record(request.root, result)
            elif future.status == "cancelled":  # the scheduler dropped it (client or cluster shut down)
                failed[stage] = "cancelled"
            else:
                failed[stage] = _failure(request.root, stage, future.exception(), distributed)
                if failed[stage].startswith("skipped"):
                    request.on_event(StageEvent("skipped", stage, detail=failed[stage]))
    finally:
        client.unsubscribe_topic(TOPIC)
    return done, failed


def _record(root: Path, result: StageResult) -> None:
    """Write a finished stage into the client's workspace: its uncached outputs, its log, then its lock entry."""
    for rel, content in result.files.items():
        path = root / rel
        assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    _write_log(root, result.stage, result.log)
    write_lock_entries(root, {result.stage: result.lock_entry})


def _failure(root: Path, stage: str, exc: BaseException, distributed) -> str:
    """One line on why ``stage`` did not finish; the failing try's log goes to ``data/logs/study``."""
    if isinstance(exc, StageFailedError) and exc.stage != stage:
        return f"skipped: upstream {exc.stage} failed"
    if isinstance(exc, StageFailedError):
        return f"{exc} (log: {_write_log(root, stage, exc.log)})"
    if isinstance(exc, distributed.KilledWorker):
        return f"its worker died on every try ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _write_log(root: Path, stage: str, text: str) -> Path:
    rel = LOG_DIR / (re.sub(r"[^A-Za-z0-9@._-]+", "_", stage) + ".log")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
    return rel


def _autostage(root: Path, lock_files: list[str]) -> None:
    """``git add`` the lock files written here when DVC would have (``core.autostage``), as ``dvc repro`` does."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "config", "core.autostage"], cwd=root, env=dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip().lower() == "true":
        subprocess.run(["git", "add", "--", *lock_files], cwd=root, capture_output=True, check=True)


def _identity(x):
    return x


@contextlib.contextmanager
def _connect(request: StudyRequest, distributed) -> Iterator[tuple[object, dict[str, str], dict[str, str]]]:
    """A Dask client: to ``request.address``, or to a LocalCluster started here (one worker per GPU).

    Yields the client, extra environment for the stages and, on a GPU LocalCluster, each worker's device.
    """
    if request.address:
        try:
            client = distributed.Client(request.address, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"no Dask scheduler answers at --address {request.address} ({exc}); start one "
                               "(`dask scheduler`, dask-jobqueue) or use --workers N for a local cluster") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
            except TimeoutError:
                raise ClusterError(f"the scheduler at {request.address} has had no worker for "
                                   f"{WAIT_FOR_WORKERS_S} s; start some (`dask worker {request.address}`)") from None
            yield client, {}, {}
        return
    gpus = _gpu_count()
    n = request.workers or gpus or 2
    env = {}
    # n workers share the cores instead of each taking all (also n cells sharing a GPU: each needs a core or two)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    # Stages run in subprocesses: the workers themselves need no memory limit and no dashboard.
    with _quiet("distributed"), distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, memory_limit=0,
                                  resources={"GPU": 1} if gpus else None) as cluster, \
            distributed.Client(cluster) as client:
        yield client, env, ({str(i): str(i % gpus) for i in range(n)} if gpus else {})


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Keep a chatty library's INFO records (cluster start-up, every connection) off the terminal."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _project_remote(root: Path, name: str | None) -> str:
    """The DVC remote workers push to and pull from; it must be in the project's config, which workers clone.

    Raises:
        ClusterError: no remote is named or set as default, or it is not in ``.dvc/config``.
    """
    if name is None:  # `dvc remote default` exits 1 when there is none
        proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=root, env=dvc_env(),
                              capture_output=True, text=True)
        name = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None
    project = [line.split()[0] for line in run_dvc(["remote", "list", "--project"], root).splitlines() if line.strip()]
    if name is None:
        raise ClusterError("the dask executor needs a DVC remote to carry data between machines: add one "
                           "(`dvc remote add -d storage s3://bucket/path`, commit .dvc/config) or pass --remote NAME")
    if name not in project:
        raise ClusterError(f"DVC remote {name!r} is not in the project config .dvc/config (project remotes: "
                           f"{', '.join(project) or 'none'}); workers clone the project and see only that file: "
                           f"`dvc remote add {name} s3://…` without --local, and commit it")
    return name


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError("--executor dask needs Dask: pip install 'featinv[cluster]'") from None
    return distributed
