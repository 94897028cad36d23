"""Study executors: how ``featinv study`` gets the DVC stages of a study run, and where.

``EXECUTORS`` maps ``--executor`` names to functions ``StudyRequest → StudyReport``:
``local`` (one ``dvc repro`` here, the default) and ``dask`` (one Dask task per
stage on many workers, DVC's remote carrying the data; needs ``featinv[cluster]``).
Importing this package registers both; Dask itself is imported only when used.
"""

from featinv.study.executors.base import (
    EXECUTORS,
    ClusterError,
    ExecutorError,
    StageEvent,
    StageFailedError,
    StageOutcome,
    StudyReport,
    StudyRequest,
    stage_kind,
)

# Registration side effects only.
from featinv.study.executors import local  # noqa: F401,E402  isort: skip
from featinv.study.executors import dask  # noqa: F401,E402  isort: skip

__all__ = ["EXECUTORS", "StudyRequest", "StudyReport", "StageOutcome", "StageEvent", "ExecutorError", "ClusterError",
           "StageFailedError", "stage_kind"]
