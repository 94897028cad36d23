"""The ``featinv`` command: a thin shell over the library (typer + rich).

Each command turns its options into a config and calls the same library
function the DVC stage calls; a :class:`FeatinvError` is printed as one line
and exits with status 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from featinv.config import Config, load_params, with_overrides
from featinv.console import console, print_error, progress_bar, setup_logging
from featinv.errors import FeatinvError

app = typer.Typer(help="featinv: how much of an image do a network's features give away?",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override a param: KEY=VALUE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
DEFAULT_CHECKPOINT = Path("data/train/best.pt")
HELDOUT_ROOT = Path("data/heldout")


def _handles_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except FeatinvError as exc:
            print_error(exc)
            raise typer.Exit(1) from None

    return wrapper


def _config(params: Path, overrides: list[str] | None) -> Config:
    return with_overrides(load_params(params), overrides or [])


@app.command()
@_handles_errors
def taps(as_json: JsonOpt = False) -> None:
    """List the built-in encoder taps with their activation shapes (channels × H × W)."""
    from featinv.encoders.taps import list_taps

    specs = list_taps()
    if as_json:
        typer.echo(json.dumps([{"tap": s.name, "shape": list(s.shape)} for s in specs], indent=2))
        return
    table = Table(title="encoder taps (224×224 input)")
    for col in ("tap", "cut", "channels × H × W", "layout"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.name, s.cut, f"{s.channels} × {s.height} × {s.width}", s.layout)
    console.print(table)
    console.print("Any timm model also works as a tap: [bold]timm:<model>/<module.path>[/], "
                  "e.g. timm:convnext_tiny/stages.0")


@app.command()
@_handles_errors
def decoders(as_json: JsonOpt = False,
             tap: Annotated[Optional[list[str]], typer.Option(help="taps to size for (default: all)")] = None) -> None:
    """List the decoders with their parameter count for each tap's shape."""
    from featinv.decoders import DECODERS, build_decoder, count_parameters
    from featinv.encoders.taps import list_taps, resolve_tap

    specs = [resolve_tap(t) for t in tap] if tap else list_taps()
    rows = [{"decoder": name, "tap": s.name, "params": count_parameters(build_decoder(name, s.shape))}
            for name in DECODERS.names() for s in specs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="decoder parameters per tap")
    table.add_column("decoder")
    for s in specs:
        table.add_column(s.name, justify="right")
    for name in DECODERS.names():
        table.add_row(name, *[f"{r['params']:,}" for r in rows if r["decoder"] == name])
    console.print(table)


@app.command()
@_handles_errors
def prepare(out: Annotated[Path, typer.Option(help="image store to write")] = Path("data/prepared/images.zarr"),
            params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Collect and preprocess the images of `data.source` into an image store."""
    from featinv.data.image_store import prepare_images

    cfg = _config(params, set_)
    with progress_bar("prepare images") as progress:
        report = prepare_images(cfg.data, cfg.seed, out, progress=progress)
    console.print(f"wrote {report.path}: {report.counts}")


@app.command()
@_handles_errors
def extract(tap: Annotated[Optional[list[str]], typer.Option(help="tap(s) to extract (default: params `taps`)")] = None,
            images: Path = Path("data/prepared/images.zarr"), features: Path = Path("data/features"),
            params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run each tap's truncated encoder once over every sample; write data/features/<tap>.zarr."""
    from featinv.store.feature_store import extract_features, store_path

    cfg = _config(params, set_)
    for name in tap or cfg.taps:
        with progress_bar(f"extract {name}") as progress:
            report = extract_features(images, name, store_path(features, name), cfg.extract, progress=progress)
        state = "up to date" if report.reused else f"{report.computed} samples on {report.device}"
        console.print(f"{report.path}: {state} ({report.seconds:.1f}s)")


@app.command()
@_handles_errors
def train(images: Path = Path("data/prepared/images.zarr"), features: Path = Path("data/features"),
          out: Path = Path("data/train"), params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the configured decoder from the cached features (the encoder is never built)."""
    from featinv.training.train import train_decoder

    cfg = _config(params, set_)
    result = train_decoder(cfg, images, features, out)
    console.print(f"best epoch {result.best_epoch} (val loss {result.best_val_loss:.5f}); "
                  f"{result.epochs_run} epochs, {result.train_seconds:.0f}s, stopped: {result.stopped}; "
                  f"wrote {result.best_checkpoint}")


@app.command()
@_handles_errors
def evaluate(checkpoint: Annotated[Optional[Path], typer.Option(
                 help="a checkpoint to evaluate as it is (default: data/train/best.pt, which must be the "
                      "finished run that params describe)")] = None,
             images: Path = Path("data/prepared/images.zarr"),
             features: Path = Path("data/features"),
             out: Annotated[Optional[Path], typer.Option(
                 help="report folder (default: metrics; with --on: the held-out folder's cache)")] = None,
             on: Annotated[Optional[Path], typer.Option(
                 "--on", help="score the run on every image in this folder instead of the test split "
                              "(prepared and extracted with the run's own settings, cached in data/heldout/)")] = None,
             refine: Annotated[Optional[int], typer.Option(help="feature-matching refinement steps")] = None,
             params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Evaluate a checkpoint on the test split (or a held-out folder): metrics JSON, per-image CSV, PNG grid."""
    import dataclasses

    from featinv.evaluation.evaluate import evaluate_run

    cfg = _config(params, set_)
    ecfg = cfg.evaluate if refine is None else dataclasses.replace(cfg.evaluate, refine=refine)
    if on is not None:
        from featinv.evaluation.heldout import evaluate_on_folder, heldout_work_dir

        work = heldout_work_dir(HELDOUT_ROOT, on)
        with progress_bar(f"held-out {on}") as bar:
            m = evaluate_on_folder(checkpoint or DEFAULT_CHECKPOINT, on, work, ecfg, out or work / "metrics",
                                   progress=lambda stage, done, total: bar(done, total))
        _print_scores(m)
        console.print(f"wrote {out or work / 'metrics'}/eval.json")
        return
    out = out or Path("metrics")
    # The default checkpoint must be the run params describe; one named on purpose is evaluated
    # as it is (a warning, recorded in the metrics' notes, says what differs).
    m = evaluate_run(checkpoint or DEFAULT_CHECKPOINT, images, features, ecfg, out / "eval.json",
                     out / "eval_per_image.csv", out / "reconstructions.png", run_config=cfg,
                     strict=checkpoint is None)
    _print_scores(m)


def _print_scores(m: dict) -> None:
    lp = m["lpips"]["mean"] if m["lpips"] else None
    thumb = next((name for name in m.get("baselines", {}) if name.startswith("thumbnail_")), None)
    console.print(f"PSNR {m['psnr']['mean']:.2f} dB · SSIM {m['ssim']['mean']:.3f} · "
                  f"LPIPS {'n/a' if lp is None else f'{lp:.3f}'} over {m['n_images']} test images"
                  + (f" · {m['psnr_over_thumbnail']:+.2f} dB over the {thumb[10:]} thumbnail" if thumb else ""),
                  highlight=False, soft_wrap=True)


@app.command()
@_handles_errors
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="image files (JPEG, PNG, …)")],
    run: Annotated[Optional[str], typer.Option(
        help="a checkpoint, a run directory holding best.pt, or a DVC experiment name (default: "
             "data/train/best.pt, which must be a finished run)")] = None,
    refine: Annotated[int, typer.Option(help="feature-matching refinement steps")] = 0,
    refine_lr: Annotated[float, typer.Option(help="Adam's step on pixels")] = 0.01,
    refine_tv: Annotated[float, typer.Option(help="total-variation prior weight")] = 0.0,
    refine_optimizer: Annotated[str, typer.Option(help="adam | lbfgs")] = "adam",
    refine_smooth: Annotated[int, typer.Option(help="optimise the correction on a grid this many times coarser")] = 1,
    refine_samples: Annotated[int, typer.Option(help="average this many refinements from noisy starts")] = 1,
    refine_noise: Annotated[float, typer.Option(help="std of each sample's start noise (needed with samples > 1)")]
    = 0.0,
    refine_seed: Annotated[int, typer.Option(help="seeds the start noise")] = 0,
    refine_backproject: Annotated[int, typer.Option(help="decoder back-projection iterations after matching")] = 0,
    refine_backproject_step: Annotated[float, typer.Option(help="each back-projection iteration's step")] = 1.0,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("reconstruction.png"),
    device: str = "auto",
) -> None:
    """Reconstruct your own images through a trained run; writes original | reconstruction | difference."""
    from featinv.device import resolve_device
    from featinv.evaluation.reconstruct import reconstruct_images, render_reconstructions

    checkpoint = _resolve_run(run or str(DEFAULT_CHECKPOINT))
    dev, _ = resolve_device(device, "--device")
    results = reconstruct_images(images, checkpoint, refine, dev, strict=run is None, lr=refine_lr, tv=refine_tv,
                                 optimizer=refine_optimizer, smooth=refine_smooth, samples=refine_samples,
                                 noise=refine_noise, seed=refine_seed, backproject=refine_backproject,
                                 backproject_step=refine_backproject_step)
    render_reconstructions(results, out, title=f"{run or DEFAULT_CHECKPOINT}"
                           + (f" + {refine} refinement steps" if refine else ""))
    for r in results:
        console.print(f"{r.path}: PSNR {r.psnr:.2f} dB · SSIM {r.ssim:.3f}")
    console.print(f"wrote {out}")


def _resolve_run(run: str) -> Path:
    """A checkpoint path for ``run``: a file, a directory with best.pt, or a DVC experiment's train output.

    Experiments are looked up through git (their refs and dvc.lock) and DVC's cache layout,
    without importing DVC.
    """
    import subprocess

    import yaml

    from featinv.errors import CheckpointError

    path = Path(run)
    if path.is_file():
        return path
    if path.is_dir() and (path / "best.pt").is_file():
        return path / "best.pt"
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
                          capture_output=True, text=True).stdout.split("\n")
    matches = [line.split()[1] for line in refs if line and line.split()[0].endswith(f"/{run}")]
    if not matches:
        raise CheckpointError(f"--run {run!r}: no such checkpoint, run directory or DVC experiment "
                              "(see `dvc exp show`)")
    lock = subprocess.run(["git", "show", f"{matches[0]}:dvc.lock"], capture_output=True, text=True).stdout
    outs = (yaml.safe_load(lock) or {}).get("stages", {}).get("train", {}).get("outs", [])
    md5 = next((o["md5"] for o in outs if o["path"].endswith("best.pt")), None)
    cached = Path(".dvc/cache/files/md5") / md5[:2] / md5[2:] if md5 else None
    if cached is None or not cached.is_file():
        raise CheckpointError(f"experiment {run!r}: its best.pt is not in the local DVC cache")
    return cached


STUDY_DVC_YAML = "study/dvc.yaml"


@app.command()
@_handles_errors
def study(list_runs: Annotated[bool, typer.Option("--list", help="list the runs without running them")] = False,
          as_json: JsonOpt = False,
          plan: Annotated[bool, typer.Option("--plan", help="show DVC's plan: which extract stages feed which runs")]
          = False,
          executor: Annotated[str, typer.Option(
              "--executor", help="local: one `dvc repro` here | dask: one task per stage on Dask workers")] = "local",
          workers: Annotated[Optional[int], typer.Option(
              "--workers", min=1, help="dask: start a local cluster of N workers (default: one per GPU, else 2)")]
          = None,
          address: Annotated[Optional[str], typer.Option(
              "--address", help="dask: use the running scheduler at ADDR (tcp://host:8786, dask-jobqueue)")] = None,
          remote: Annotated[Optional[str], typer.Option(
              "--remote", help="dask: the DVC remote that carries data between machines (default: the default one)")]
          = None,
          retries: Annotated[int, typer.Option("--retries", min=0, help="dask: tries again a stage that fails")] = 2,
          params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the whole study (every tap × decoder + fusion × decoder) on one shared feature cache.

    Drives `dvc repro study/dvc.yaml`: each tap is extracted once by the root pipeline's
    extract@<tap> stage, every run trains from the cached stores, and the leaderboard lands in
    study/results/.  With `--executor dask` the stages run as Dask tasks on many workers, a DVC
    remote carries the data, and this workspace ends up as a sequential study leaves it.
    """
    import sys

    from featinv.errors import ParamsError
    from featinv.study.executors import EXECUTORS, ClusterError, StudyRequest
    from featinv.study.executors.progress import study_progress
    from featinv.study.grid import plan_runs

    cfg = load_params(params)
    runs = plan_runs(cfg)
    if list_runs:
        if as_json:
            typer.echo(json.dumps([r.to_dict() for r in runs], indent=2))
        else:
            for i, r in enumerate(runs, 1):
                console.print(f"{i:3d}  {r.label:24s} {r.decoder}")
        return
    missing = sorted(set(cfg.study.taps or cfg.taps) - set(cfg.taps))
    missing += sorted(set(cfg.study.ensemble_taps) - set(cfg.taps)) if cfg.study.fusions else []
    if missing:
        raise ParamsError(f"study taps {', '.join(sorted(set(missing)))} are not in `taps`, so nothing extracts "
                          "them; add them to `taps` in params.yaml")
    if plan:
        feeds = _study_plan()
        extracts = sorted({e for sources in feeds.values() for e in sources})
        if as_json:
            typer.echo(json.dumps({"extract_stages": extracts, "runs": feeds}, indent=2))
        else:
            for run_stage, sources in feeds.items():
                console.print(f"{run_stage}  ←  {', '.join(sources)}")
            console.print(f"{len(extracts)} extract stages (each runs at most once per `dvc repro`) "
                          f"feed {len(feeds)} training runs")
        return
    run_study = EXECUTORS.get(executor)
    if workers and address:
        raise ParamsError("--workers starts a local cluster and --address uses a running one: pass one of them")
    with study_progress(console) as on_event:
        report = run_study(StudyRequest(
            root=Path.cwd(), target=STUDY_DVC_YAML, client_stages=frozenset({f"{STUDY_DVC_YAML}:leaderboard"}),
            workers=workers, address=address, remote=remote, retries=retries, echo=sys.stderr.write,
            on_event=on_event))
    for line in report.summary_lines(len(runs)):
        console.print(line, highlight=False)
    if report.failed:
        raise ClusterError(f"{len(report.failed)} stages did not finish (above; logs in data/logs/study/); "
                           "the others are recorded, and `featinv study` runs only what is missing")
    console.print("leaderboard: study/results/leaderboard.md · figures: study/results/*.png · "
                  "compare: `dvc metrics show`")


def _study_plan() -> dict[str, list[str]]:
    """Each study run stage → the extract stages it reads, from `dvc dag --dot` (nothing runs)."""
    import re
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot", STUDY_DVC_YAML],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise FeatinvError(f"`dvc dag {STUDY_DVC_YAML}` failed: {proc.stderr.strip()[-300:]}")
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', proc.stdout)
    nodes = re.findall(r'^"([^"]+)";$', proc.stdout, flags=re.M)
    runs = [n for n in nodes if n.startswith((f"{STUDY_DVC_YAML}:run@", f"{STUDY_DVC_YAML}:ensemble@"))]
    return {r: sorted(a for a, b in edges if b == r and a.startswith("extract@")) for r in runs}


def _run_dvc_repro(targets: list[str], dry: bool = False) -> dict[str, int]:
    """Run `dvc repro <targets>`, streaming its output; return how often each stage ran."""
    import sys

    from featinv.study.executors import StudyRequest
    from featinv.study.executors.local import repro

    return repro(StudyRequest(root=Path.cwd(), target=STUDY_DVC_YAML, echo=sys.stderr.write), targets, dry=dry)


@app.command()
@_handles_errors
def preset(name: Annotated[str, typer.Argument(help="preset name (paper | local_mlp)")],
           as_json: JsonOpt = False) -> None:
    """Print a preset as `dvc exp run` overrides, e.g. `dvc exp run $(featinv preset paper)`."""
    from featinv.presets import PRESETS, preset_overrides

    overrides = preset_overrides(name)
    if as_json:
        typer.echo(json.dumps(PRESETS[name], indent=2))
        return
    typer.echo(" ".join(f"-S {item}" for item in overrides))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
