"""Peak RSS of one ``train_decoder`` run in a fresh process (figure 6 of ``benchmarks.run``).

    python -m benchmarks.peak_rss < job.pickle     # prints {"peak_rss_mb": ...}

stdin holds a pickled ``(cfg, images, features, out)`` job for
``featinv.training.train.train_decoder``, or None to measure the imports alone (the
baseline).  Only what training needs is imported, so the baseline is the same
for every job.

The peak is VmHWM from /proc/self/status: ``ru_maxrss`` survives ``execve`` on
Linux, so a child starts out with its parent's RSS at fork time and would
report that instead (seen here: ~2 GB for a child that only imported torch).
"""

from __future__ import annotations

import json
import pickle
import resource
import sys
from pathlib import Path

from featinv.training.train import train_decoder


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (VmHWM; ``ru_maxrss`` where there is no /proc)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10


def main() -> None:
    job = pickle.loads(sys.stdin.buffer.read())
    if job is not None:
        train_decoder(*job)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
