"""Run a command that dies with the process that started it: ``python -m featinv.study.executors.guard CMD ARGS…``.

A Dask worker runs each stage as ``dvc …`` in a subprocess.  When the worker is
killed (SIGKILL, node lost), its children would live on as orphans, still
training, and might even push a result after the scheduler has handed the
stage to another worker.  The guard starts the command in a process group of
its own and kills that whole group (dvc and the stage command under it) as soon
as its parent, the worker, is gone.  It exits with the command's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

__all__ = ["main"]

POLL_SECONDS = 0.5


def main(argv: list[str]) -> int:
    parent = os.getppid()
    proc = subprocess.Popen(argv, start_new_session=True)

    def kill_group(*_args) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, lambda *a: (kill_group(), sys.exit(143)))
    while proc.poll() is None:
        if os.getppid() != parent:  # the worker died: nobody will use this stage's result
            kill_group()
            proc.wait()
            return 137
        time.sleep(POLL_SECONDS)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
