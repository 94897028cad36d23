"""DVC through its command line only: run it, read its DAG and status, read and merge lock entries.

The library never imports DVC (house rule); executors talk to it as a user
would, with ``python -m dvc …`` in a subprocess.  Lock entries are read and
written in the documented ``dvc.lock`` format (schema 2.0), never through
DVC's Python internals.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from featinv.study.executors.base import ExecutorError

__all__ = ["dvc_env", "run_dvc", "repro_streaming", "read_dag", "changed_stages", "StagePlan", "plan_stages",
           "lock_location", "stage_wdir", "read_lock_entry", "write_lock_entries", "RUNNING", "RESTORED"]

RUNNING = re.compile(r"Running stage '([^']+)'")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``dvc``: stage commands call ``python``, so make it this interpreter."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_dvc(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``dvc <args>`` in ``cwd``; return stdout + stderr.

    Raises:
        ExecutorError: it exited non-zero (the message has the command and the end of its output).
    """
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env or dvc_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = " | ".join(ln for ln in proc.stdout.strip().splitlines()[-4:] if ln.strip())
        raise ExecutorError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {proc.returncode}): {tail}")
    return proc.stdout


def repro_streaming(args: list[str], cwd: Path, echo: Callable[[str], None]) -> tuple[dict[str, int], int]:
    """Run ``dvc repro <args>`` streaming every line to ``echo``; return how often each stage ran, and the exit code."""
    counts: collections.Counter[str] = collections.Counter()
    cmd = [sys.executable, "-m", "dvc", "repro", *args]
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dvc_env()) as proc:
        for line in proc.stdout:
            echo(line)
            match = RUNNING.match(line)
            if match:
                counts[match.group(1)] += 1
    return dict(counts), proc.returncode


def read_dag(root: Path, target: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The stages of ``target``'s pipeline (upstream included) and its edges, from ``dvc dag --dot``."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot", target], cwd=root, env=dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExecutorError(f"`dvc dag {target}` failed: {proc.stderr.strip()[-300:]}")
    nodes = re.findall(r'^"([^"]+)";$', proc.stdout, flags=re.M)
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', proc.stdout, flags=re.M)
    return nodes, edges


def changed_stages(root: Path, target: str) -> set[str]:
    """Stages of ``target``'s pipeline that ``dvc status`` reports changed (by their own deps, params or outs)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "--with-deps", target], cwd=root,
                          env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExecutorError(f"`dvc status {target}` failed: {proc.stderr.strip()[-300:]}")
    return set(json.loads(proc.stdout or "{}"))


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Which stages a study runs, in dependency order.

    Attributes:
        order: every stage of the pipeline, parents before children.
        parents: each stage's direct upstream stages.
        to_run: changed stages and everything downstream of them (``dvc repro`` would run or restore these).
        distributed: the stages of ``to_run`` that go to workers, in order (all but the client's own).
    """

    order: tuple[str, ...]
    parents: dict[str, tuple[str, ...]]
    to_run: frozenset[str]
    distributed: tuple[str, ...]


def plan_stages(nodes: list[str], edges: Iterable[tuple[str, str]], changed: set[str],
                client_stages: Iterable[str] = ()) -> StagePlan:
    """Plan a study from its DAG and ``dvc status``: what a sequential ``dvc repro`` would have to run.

    ``dvc status`` compares each stage with the workspace as it is now, so a stage whose upstream will
    change still looks clean; everything downstream of a changed stage is therefore run too.
    """
    parents: dict[str, list[str]] = {n: [] for n in nodes}
    children: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        parents[b].append(a)
        children[a].append(b)
    order, ready = [], [n for n in nodes if not parents[n]]
    waiting = {n: len(parents[n]) for n in nodes}
    while ready:  # Kahn's algorithm, keeping DVC's node order among equals
        node = ready.pop(0)
        order.append(node)
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    assert len(order) == len(nodes), "dvc dag is not acyclic"
    to_run: set[str] = set()
    for node in order:
        if node in changed or any(p in to_run for p in parents[node]):
            to_run.add(node)
    keep = set(client_stages)
    return StagePlan(order=tuple(order), parents={n: tuple(p) for n, p in parents.items()},
                     to_run=frozenset(to_run), distributed=tuple(n for n in order if n in to_run and n not in keep))


def lock_location(stage: str) -> tuple[str, str]:
    """A stage address → (its lock file, its key there): ``study/dvc.yaml:run@x`` → ``study/dvc.lock``, ``run@x``."""
    if ":" in stage:
        dvcfile, name = stage.rsplit(":", 1)
        return str(Path(dvcfile).with_name("dvc.lock")), name
    return "dvc.lock", stage


def stage_wdir(root: Path, stage: str) -> Path:
    """The directory a stage's lock paths are relative to: its dvc.yaml's directory joined with its ``wdir``."""
    dvcfile = stage.rsplit(":", 1)[0] if ":" in stage else "dvc.yaml"
    name = stage.rsplit(":", 1)[-1].split("@", 1)[0]  # foreach/matrix stages share their definition's wdir
    definition = ((yaml.safe_load((root / dvcfile).read_text()) or {}).get("stages") or {}).get(name) or {}
    return Path(os.path.normpath(root / Path(dvcfile).parent / str(definition.get("wdir", "."))))


def read_lock_entry(root: Path, stage: str) -> dict | None:
    """The lock entry DVC recorded for ``stage`` under ``root`` (None if it has none)."""
    path, name = lock_location(stage)
    try:
        lock = yaml.safe_load((root / path).read_text()) or {}
    except FileNotFoundError:
        return None
    return (lock.get("stages") or {}).get(name)


def write_lock_entries(root: Path, entries: dict[str, dict]) -> None:
    """Record ``entries`` (stage → lock entry) in the lock files under ``root``, each file replaced atomically.

    The entries are exactly what DVC wrote where the stage ran; a reader never sees a half-written lock.
    """
    by_file: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for stage, entry in entries.items():
        path, name = lock_location(stage)
        by_file[path][name] = entry
    for path, new in by_file.items():
        target = root / path
        lock = (yaml.safe_load(target.read_text()) if target.is_file() else None) or {}
        lock.setdefault("schema", "2.0")
        lock.setdefault("stages", {}).update(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dvc.lock.", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(lock, f, sort_keys=False, width=120)
        os.replace(tmp, target)
