"""What every study executor shares: the registry, the request, the report and the errors.

An executor gets a study's DVC stages run and says where each one ran.  The
``local`` executor is one ``dvc repro`` (the default); ``dask`` spreads the
stages over Dask workers and lets DVC's remote carry the data (see
:mod:`featinv.study.executors.dask`).  Either way DVC stays the record: the client's
lock files, metrics and outputs end up as one sequential ``dvc repro`` leaves them.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from featinv.errors import FeatinvError
from featinv.registry import Registry

__all__ = ["EXECUTORS", "StudyRequest", "StageEvent", "StageOutcome", "StudyReport", "ExecutorError",
           "ClusterError", "StageFailedError", "stage_kind"]


class ExecutorError(FeatinvError):
    """A study executor could not finish: ``dvc`` failed, or stages failed."""


class ClusterError(ExecutorError):
    """The distributed executor cannot do its job (no remote, no scheduler, no commit, a stage failed)."""


class StageFailedError(ClusterError):
    """One stage failed on a worker; carries the worker's name and the full log of that try.

    Dask sends it back to the client pickled, hence ``__reduce__``.
    """

    def __init__(self, stage: str, worker: str, log: str) -> None:
        self.stage, self.worker, self.log = stage, worker, log
        self.reason = _reason(log)
        super().__init__(f"{stage} failed on worker {worker}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.stage, self.worker, self.log))


def _reason(log: str) -> str:
    """One line on why a try failed: the stage command's last words and its exit status, else DVC's error."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("ERROR: failed to reproduce"):
            status = re.search(r"exited with (-?\d+)$", lines[i])
            said = lines[i - 1] if i and not lines[i - 1].startswith(("> ", "$ ", "Running stage")) else ""
            if status:
                return (f"{said} " if said else "") + f"(the stage command exited with {status.group(1)})"
            return lines[i][len("ERROR: "):][-300:]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[-300:]


@dataclasses.dataclass(frozen=True)
class StageEvent:
    """Progress of one stage: ``start``, ``done``, ``failed`` (one try), ``skipped``; ``end`` when all are in."""

    kind: str
    stage: str
    worker: str = ""
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class StudyRequest:
    """What to run and how; one per ``featinv study`` call.

    Attributes:
        root: the DVC project (the client's workspace).
        target: the dvc.yaml whose pipeline is the study (``study/dvc.yaml``).
        client_stages: stages that always run on the client, in its final ``dvc repro`` (the leaderboard).
        workers: dask: start a LocalCluster with this many workers (None: one per GPU, else 2).
        address: dask: connect to this running scheduler instead.
        remote: dask: the DVC remote that carries data between machines (None: the project's default).
        retries: dask: how often a stage that fails is tried again.
        echo: receives every line of the client's own ``dvc`` output.
        on_event: receives progress events (dask).
    """

    root: Path
    target: str
    client_stages: frozenset[str] = frozenset()
    workers: int | None = None
    address: str | None = None
    remote: str | None = None
    retries: int = 2
    echo: Callable[[str], None] = lambda line: None
    on_event: Callable[[StageEvent], None] = lambda event: None


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """Where one stage ran and what DVC did there (``ran``, ``restored`` from the run-cache, ``pulled``)."""

    stage: str
    where: str  # "client" or the worker's name
    action: str
    seconds: float | None = None


@dataclasses.dataclass
class StudyReport:
    """What an executor did: one outcome per stage it touched, and the stages that failed."""

    executor: str
    outcomes: list[StageOutcome] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # stage → reason (and log path)
    workers: int = 0

    def summary_lines(self, planned: int) -> list[str]:
        """What the study did, for the terminal: how many runs and extractions ran, where, and what failed."""
        ran = [o for o in self.outcomes if o.action == "ran"]
        extracted = Counter(o.stage.split("@", 1)[1] for o in ran if stage_kind(o.stage) == "extract")
        trained = sum(stage_kind(o.stage) in ("run", "ensemble") for o in ran)
        lines = [f"[bold]study:[/] {planned} runs planned; ran {trained} training runs and {len(extracted)} extractions "
                 f"({', '.join(f'{k}×{v}' for k, v in extracted.items()) or 'all cached'})"]
        if self.executor != "local":
            where = " · ".join(self._place_line(p) for p in self.places()) or "nothing ran"
            lines.append(f"{self.executor} on {self.workers} workers — {where}" if self.workers else
                         f"{self.executor}: no stage needed a worker (all up to date) — {where}")
        lines += [f"[red]failed:[/] {stage}: {reason}" for stage, reason in self.failed.items()]
        return lines

    def places(self) -> list[str]:
        """Every place that did something: workers first (by name), the client last."""
        names = {o.where for o in self.outcomes}
        return sorted(names - {"client"}, key=lambda n: (len(n), n)) + (["client"] if "client" in names else [])

    def _place_line(self, place: str) -> str:
        mine = [o for o in self.outcomes if o.where == place]
        kinds = Counter(_KIND_NAMES.get(stage_kind(o.stage), stage_kind(o.stage)) for o in mine if o.action == "ran")
        kept = sum(o.action != "ran" for o in mine)
        what = ", ".join(f"{n} {kind}" for kind, n in kinds.items()) or "nothing computed"
        return (f"{place if place == 'client' else 'worker ' + place}: {what}"
                + (f" (+{kept} restored from the run-cache or remote)" if kept else ""))


_KIND_NAMES = {"extract": "extractions", "run": "training runs", "ensemble": "ensemble runs", "prepare": "prepare",
               "leaderboard": "leaderboard"}


def stage_kind(stage: str) -> str:
    """``study/dvc.yaml:run@vgg16/block1-wavelet`` → ``run``; ``extract@vgg16/block1`` → ``extract``."""
    return stage.rsplit(":", 1)[-1].split("@", 1)[0]


EXECUTORS: Registry[Callable[[StudyRequest], StudyReport]] = Registry("executor", param="--executor")
