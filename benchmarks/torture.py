"""Kill prepare, extraction and training at random moments; check nothing complete-looking is left.

For each stage, a reference run goes uninterrupted; then ``--kills`` times the same command
(the ``featinv`` CLI, a fresh process) is sent SIGKILL at a random moment of its run, and the
invariants a user relies on are checked:

* after the kill, the stage's output either does not exist or is whole: a store is opened
  only if complete (and is then identical to the reference), a checkpoint left behind is
  marked unfinished — so ``featinv evaluate`` refuses it — or is the finished run;
* re-running the command completes it, and the resumed store is byte-identical (array bytes
  and attributes) to the uninterrupted one.

    python -m benchmarks.torture --kills 10        # writes benchmarks/results/torture.json

Seeded (``--seed``), on a tiny sample-source project (10 tiles, 2 views, vgg16/block1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, write_json

PARAMS = """\
data: {source: sample, max_images: 10, train_views: 2}
taps: [vgg16/block1]
extract: {device: cpu, batch_size: 2}
train: {epochs: 3, batch_size: 4, lr: 0.001, device: cpu}
evaluate: {device: cpu, grid_images: 2}
"""
STAGES = {
    "prepare": ["prepare", "--out", "images.zarr"],
    "extract": ["extract", "--images", "images.zarr", "--features", "features"],
    "train": ["train", "--images", "images.zarr", "--features", "features", "--out", "data/train"],
}
# data/train/best.pt: the checkpoint `featinv evaluate` picks by default, and checks strictly.
OUTPUT = {"prepare": "images.zarr", "extract": "features/vgg16/block1.zarr", "train": "data/train/best.pt"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10, help="kills per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "torture.json")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="featinv-torture-") as tmp:
        project = Path(tmp)
        (project / "params.yaml").write_text(PARAMS)
        # Kills land after the interpreter has started (imports are not what is tested) and
        # before the uninterrupted run would have finished.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "featinv.cli", "--help"], cwd=project, capture_output=True)
        startup = time.perf_counter() - t0
        reference, seconds = {}, {}
        for stage in STAGES:  # uninterrupted: the reference outputs and how long each stage takes
            t0 = time.perf_counter()
            _run(project, stage)
            seconds[stage] = time.perf_counter() - t0
            reference[stage] = _digest(project / OUTPUT[stage], stage)
        cases = []
        for stage in STAGES:
            for k in range(args.kills):
                delay = rng.uniform(min(startup, 0.9 * seconds[stage]), seconds[stage])
                cases.append(_kill_and_resume(project, stage, delay, reference[stage]))
                print(f"{stage} kill {k + 1}/{args.kills} at {delay:.1f}s: {cases[-1]['verdict']}", flush=True)
    summary = {
        "machine": machine(),
        "command": f"python -m benchmarks.torture --kills {args.kills} --seed {args.seed}",
        "stage_seconds": seconds,
        "startup_seconds": startup,
        "cases": len(cases),
        "passed": sum(c["verdict"] == "ok" for c in cases),
        "killed_mid_run": sum(c["killed"] for c in cases),
        "by_stage": {s: {"cases": sum(c["stage"] == s for c in cases),
                         "passed": sum(c["stage"] == s and c["verdict"] == "ok" for c in cases)} for s in STAGES},
        "failures": [c for c in cases if c["verdict"] != "ok"],
    }
    write_json(args.out, summary)
    print(f"{summary['passed']}/{summary['cases']} cases held ({summary['killed_mid_run']} killed mid-run); "
          f"wrote {args.out}")
    return summary


def _kill_and_resume(project: Path, stage: str, delay: float, reference: str) -> dict:
    output = project / OUTPUT[stage]
    _remove(output)
    _remove(output.with_name(output.name + ".partial"))
    if stage == "train":
        _remove(project / "data" / "train")
        _run(project, "train", extra=["-S", "decoder=wavelet", "-S", "train.epochs=1"])  # a previous, other run
    proc = subprocess.Popen([sys.executable, "-m", "featinv.cli", *STAGES[stage]], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    problem = _after_kill_problem(project, stage, reference, killed)
    if problem is None:
        _run(project, stage)  # resume
        if _digest(output, stage) != reference:
            problem = "the resumed output differs from the uninterrupted one"
    return {"stage": stage, "delay_s": round(delay, 2), "killed": killed, "verdict": problem or "ok"}


def _after_kill_problem(project: Path, stage: str, reference: str, killed: bool) -> str | None:
    """What is wrong with what the killed run left, or None."""
    output = project / OUTPUT[stage]
    if stage == "train":
        if not output.exists():
            return None
        # Evaluate may accept only the finished run that params describe (transposed_conv, 3 epochs),
        # never the killed run's partial checkpoint nor the previous (wavelet) run's.
        proc = subprocess.run([sys.executable, "-m", "featinv.cli", "evaluate", "--images", "images.zarr",
                               "--features", "features", "--out", "metrics"], cwd=project,
                              capture_output=True, text=True)
        state = _checkpoint_state(output)
        if proc.returncode == 0 and state != "True transposed_conv":
            return f"evaluate accepted a checkpoint that is not the finished run ({state})"
        if proc.returncode != 0 and not killed:
            return f"evaluate refused the finished run: {proc.stderr.strip()[-200:]}"
        return None
    if not output.exists():
        return None
    opener = "ImageStore" if stage == "prepare" else "FeatureStore"
    module = "image_store" if stage == "prepare" else "feature_store"
    check = subprocess.run([sys.executable, "-c", f"from featinv.{module} import {opener}; {opener}({str(output)!r})"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        return f"an incomplete store was left at the final path: {check.stderr.strip()[-200:]}"
    if _digest(output, stage) != reference:
        return "a store at the final path differs from the uninterrupted one"
    return None


def _checkpoint_state(path: Path) -> str:
    """``'<finished> <decoder>'`` of a checkpoint."""
    code = (f"import torch; c = torch.load({str(path)!r}, weights_only=False); "
            "print(c.get('finished'), c.get('decoder'))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def _digest(path: Path, stage: str) -> str:
    """A store's array bytes and attributes (a checkpoint: whether it finished; weights vary by timing)."""
    if stage == "train":
        return _checkpoint_state(path)
    sha = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        data = file.read_bytes()
        if file.name == "zarr.json":  # attrs are JSON: compare them key-sorted, not byte for byte
            data = json.dumps(json.loads(data), sort_keys=True).encode()
        sha.update(rel.encode() + b"\0" + data)
    return sha.hexdigest()


def _run(project: Path, stage: str, extra: list[str] | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "featinv.cli", *STAGES[stage], *(extra or [])], cwd=project,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`featinv {stage}` failed: {proc.stderr.strip()[-500:]}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


if __name__ == "__main__":
    main()
