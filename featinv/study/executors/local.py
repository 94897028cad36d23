"""The ``local`` executor: the whole study in one ``dvc repro`` on this machine (the default).

DVC runs the stages one after another, each tap's extraction once, every run
reading the shared stores in place.
"""

from __future__ import annotations

from featinv.errors import ParamsError
from featinv.study.executors.base import EXECUTORS, ExecutorError, StageOutcome, StudyReport, StudyRequest
from featinv.study.executors.dvc_cli import repro_streaming

__all__ = ["run_local", "repro"]


def repro(request: StudyRequest, targets: list[str], dry: bool = False) -> dict[str, int]:
    """``dvc repro <targets>`` in ``request.root``, streaming its output; how often each stage ran.

    Raises:
        ExecutorError: ``dvc repro`` failed (its output, above, says why).
    """
    args = [*targets] + (["--dry"] if dry else [])
    counts, code = repro_streaming(args, request.root, request.echo)
    if code != 0:
        raise ExecutorError(f"`dvc repro {' '.join(args)}` failed (exit {code}); see the output above")
    return counts


@EXECUTORS.register("local")
def run_local(request: StudyRequest) -> StudyReport:
    """Run the study with one ``dvc repro`` of ``request.target`` on this machine.

    Raises:
        ParamsError: a distributed option (workers, address, remote) was given.
    """
    given = [opt for opt, value in (("--workers", request.workers), ("--address", request.address),
                                    ("--remote", request.remote)) if value]
    if given:
        raise ParamsError(f"{', '.join(given)} only apply to --executor dask (the local executor runs one "
                          "`dvc repro` here)")
    counts = repro(request, [request.target])
    outcomes = [StageOutcome(stage, "client", "ran") for stage, n in counts.items() for _ in range(n)]
    return StudyReport(executor="local", outcomes=outcomes)
