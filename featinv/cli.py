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
from featinv.console import console, progress_bar, setup_logging
from featinv.errors import FeatinvError

app = typer.Typer(help="featinv: how much of an image do a network's features give away?",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="override a param: KEY=VALUE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]


def _handles_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except FeatinvError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _config(params: Path, overrides: list[str] | None) -> Config:
    return with_overrides(load_params(params), overrides or [])


@app.command()
@_handles_errors
def taps(as_json: JsonOpt = False) -> None:
    """List the built-in encoder taps with their activation shapes (channels × H × W)."""
    from featinv.taps import list_taps

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
    from featinv.taps import list_taps, resolve_tap

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
    from featinv.image_store import prepare_images

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
    from featinv.feature_store import extract_features, store_path

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
    from featinv.train import train_decoder

    cfg = _config(params, set_)
    result = train_decoder(cfg, images, features, out)
    console.print(f"best epoch {result.best_epoch} (val loss {result.best_val_loss:.5f}); "
                  f"{result.epochs_run} epochs, {result.train_seconds:.0f}s, stopped: {result.stopped}; "
                  f"wrote {result.best_checkpoint}")


@app.command()
@_handles_errors
def evaluate(checkpoint: Path = Path("data/train/best.pt"), images: Path = Path("data/prepared/images.zarr"),
             features: Path = Path("data/features"), out: Path = Path("metrics"),
             refine: Annotated[Optional[int], typer.Option(help="feature-matching refinement steps")] = None,
             params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Evaluate a checkpoint on the test split: metrics JSON, per-image CSV, PNG grid."""
    import dataclasses

    from featinv.evaluate import evaluate_run

    cfg = _config(params, set_)
    ecfg = cfg.evaluate if refine is None else dataclasses.replace(cfg.evaluate, refine=refine)
    m = evaluate_run(checkpoint, images, features, ecfg, out / "eval.json", out / "eval_per_image.csv",
                     out / "reconstructions.png")
    lp = m["lpips"]["mean"] if m["lpips"] else None
    console.print(f"PSNR {m['psnr']['mean']:.2f} dB · SSIM {m['ssim']['mean']:.3f} · "
                  f"LPIPS {'n/a' if lp is None else f'{lp:.3f}'} over {m['n_images']} test images")


PRESETS: dict[str, dict[str, object]] = {
    # The published study's protocol (DIV2K, ImageNet weights, its loss and schedule).
    "paper": {
        "data.source": "div2k",
        "extract.weights": "imagenet",
        "train.loss.mse": 0.5,
        "train.loss.lpips": 0.5,
        "train.lr": 0.0001,
        "train.batch_size": 4,
        "train.scheduler": "plateau",
        "train.plateau_patience": 5,
        "train.early_stop_patience": 15,
        "train.epochs": 30,
    },
}


@app.command()
@_handles_errors
def preset(name: Annotated[str, typer.Argument(help="preset name (paper)")],
           as_json: JsonOpt = False) -> None:
    """Print a preset as `dvc exp run` overrides, e.g. `dvc exp run $(featinv preset paper)`."""
    from featinv.errors import UnknownNameError

    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    if as_json:
        typer.echo(json.dumps(PRESETS[name], indent=2))
        return
    typer.echo(" ".join(f"-S {k}={v}" for k, v in PRESETS[name].items()))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
