"""The project as the client sees it, shipped to workers that share no filesystem with it.

A snapshot is the client's git revision as a git bundle, plus an overlay of
every file that differs from that revision in the working tree as git sees it
(modified, staged, deleted, untracked but not ignored: the lock files, an edited
params.yaml).  A worker clones the bundle, checks the revision out and applies
the overlay, so its stages see exactly the client's code and params.  Ignored
files (data, caches) never travel: workers pull the data they need from the
DVC remote.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path

from featinv.study.executors.base import ClusterError

__all__ = ["ProjectSnapshot", "take_snapshot", "materialize", "MAX_OVERLAY_BYTES"]

MAX_OVERLAY_BYTES = 64 * 2**20  # uncommitted files travel with every task: keep them small


@dataclasses.dataclass(frozen=True)
class ProjectSnapshot:
    """A git revision (``bundle`` holds its history) and the working tree's changes against it."""

    revision: str
    bundle: bytes
    overlay: dict[str, bytes | None]  # path → content, None for a deleted file

    def describe(self) -> str:
        return f"{self.revision[:10]}" + (f" + {len(self.overlay)} uncommitted files" if self.overlay else "")


def _git(args: list[str], cwd: Path) -> bytes:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        raise ClusterError(f"`git {' '.join(args)}` failed in {cwd}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def take_snapshot(root: Path) -> ProjectSnapshot:
    """Snapshot the project at ``root`` for the workers.

    Raises:
        ClusterError: ``root`` is not a git repository with a commit, or its uncommitted files are too big.
    """
    try:
        revision = _git(["rev-parse", "--verify", "HEAD"], root).decode().strip()
    except ClusterError:
        raise ClusterError(f"{root} has no git commit: workers clone the project at the client's revision; "
                           "commit first (`git commit`)") from None
    changed = _git(["diff", "--name-only", "-z", "--no-renames", "HEAD"], root).split(b"\0")
    untracked = _git(["ls-files", "-z", "--others", "--exclude-standard"], root).split(b"\0")
    overlay: dict[str, bytes | None] = {}
    for raw in filter(None, changed + untracked):
        rel = os.fsdecode(raw)
        path = root / rel
        overlay[rel] = path.read_bytes() if path.is_file() else None
    size = sum(len(v) for v in overlay.values() if v)
    if size > MAX_OVERLAY_BYTES:
        biggest = max((k for k, v in overlay.items() if v), key=lambda k: len(overlay[k] or b""))
        raise ClusterError(f"uncommitted files in {root} total {size / 2**20:.0f} MiB (largest: {biggest}); "
                           "every worker gets them: commit, DVC-track or git-ignore them")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "project.bundle"
        _git(["bundle", "create", "--quiet", str(bundle), "HEAD"], root)
        return ProjectSnapshot(revision=revision, bundle=bundle.read_bytes(), overlay=overlay)


def materialize(snapshot: ProjectSnapshot, dest: Path) -> Path:
    """Recreate the client's project at ``dest`` (a new directory); return it."""
    bundle = dest.with_name(dest.name + ".bundle")
    bundle.write_bytes(snapshot.bundle)
    _git(["clone", "--quiet", "--no-checkout", str(bundle), str(dest)], dest.parent)
    _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", snapshot.revision], dest)
    bundle.unlink()
    for rel, content in snapshot.overlay.items():
        path = dest / rel
        assert not Path(rel).is_absolute() and ".." not in Path(rel).parts, rel
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return dest
