"""The study's results: its runs' metrics in the published study's ranking form, and figures.

:func:`leaderboard` ranks the cells of :mod:`featinv.study.grid` beside each tap's non-learned
baselines; the figures answer the study's question at a glance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from featinv.study.grid import StudyRun, run_dir
from featinv.training.model import ENSEMBLE

__all__ = ["collect_results", "baseline_rows", "leaderboard", "write_leaderboard",
           "best_runs_figure", "depth_figure"]

log = logging.getLogger(__name__)


def collect_results(metrics_root: str | Path, runs: list[StudyRun]) -> pd.DataFrame:
    """One row per run that has a metrics JSON (``<metrics_root>/<label>/<decoder>.json``)."""
    rows = []
    for run in runs:
        path = Path(metrics_root) / run.label / f"{run.decoder}.json"
        if not path.is_file():
            log.warning("no metrics for %s + %s (%s)", run.label, run.decoder, path)
            continue
        m = json.loads(path.read_text(encoding="utf-8"))
        refine = m.get("refine") or {}
        decoder_only = m.get("decoder_only") or {}
        train = m.get("train") or {}
        thumbnail = next((b for name, b in (m.get("baselines") or {}).items() if name.startswith("thumbnail_")), None)
        rows.append({
            "tap_or_fusion": run.label,
            "decoder": run.decoder,
            "psnr": m["psnr"]["mean"],
            "ssim": m["ssim"]["mean"],
            "lpips": (m.get("lpips") or {}).get("mean"),
            "decoder_params": m.get("decoder_params"),
            "train_seconds": train.get("train_seconds"),
            "samples_seen": train.get("samples_seen"),
            "epochs": train.get("epochs_run"),
            # Best epoch = last epoch: the run was still improving when its budget ran out.
            "still_improving": train.get("best_epoch") is not None and train.get("best_epoch") == train.get("epochs_run"),
            "refine_steps": refine.get("steps", 0),
            "psnr_decoder_only": (decoder_only.get("psnr") or {}).get("mean", m["psnr"]["mean"]),
            "psnr_over_thumbnail": m.get("psnr_over_thumbnail"),
            "weights": m.get("weights"),
            "baselines": m.get("baselines") or {},
            "thumbnail_psnr": thumbnail["psnr"]["mean"] if thumbnail else None,
        })
    return pd.DataFrame(rows)


def baseline_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The non-learned baselines of the runs' taps (or fusions), on the same test images.

    A baseline row's ``decoder`` is ``baseline: <name>`` (``baseline: thumbnail_28x28``); it has no
    parameters, training, budget or encoder weights. Taps whose baseline scores the same share one
    row that names them (``vgg16/block3, resnet34/layer2``: one grid, one thumbnail), or says
    ``every tap``, instead of repeating it per tap. Only a thumbnail row has a margin over the
    thumbnail (zero): a grid-free baseline (mean colour, dataset mean) is the same for every tap.
    """
    rows: dict[tuple, dict] = {}
    taps_with_baselines = []
    for r in results.itertuples():
        thumbnail_psnr = getattr(r, "thumbnail_psnr", None)
        for name, scores in (getattr(r, "baselines", None) or {}).items():
            psnr, ssim = scores["psnr"]["mean"], scores["ssim"]["mean"]
            thumbnail = name.startswith("thumbnail_") and thumbnail_psnr is not None
            key = (name, round(psnr, 9), round(ssim, 9))
            row = rows.setdefault(key, {"taps": [], "decoder": f"baseline: {name}", "psnr": psnr, "ssim": ssim,
                                        "weights": "", "psnr_over_thumbnail": psnr - thumbnail_psnr if thumbnail
                                        else None})
            for taps in (row["taps"], taps_with_baselines):
                if r.tap_or_fusion not in taps:
                    taps.append(r.tap_or_fusion)
    return pd.DataFrame([{"tap_or_fusion": "every tap" if len(taps_with_baselines) > 1
                          and row["taps"] == taps_with_baselines else ", ".join(row["taps"]),
                          **{k: v for k, v in row.items() if k != "taps"}} for row in rows.values()])


def leaderboard(results: pd.DataFrame, baselines: bool = True) -> pd.DataFrame:
    """Rank runs by PSNR (the published study's ranking), SSIM breaking ties.

    With ``baselines``, each tap's non-learned baselines are listed among the runs (rank 0: they
    are references, not entries), so a reader sees which runs do not beat a thumbnail.
    """
    runs = results.drop(columns=["baselines"], errors="ignore").assign(rank=0)
    runs = runs.sort_values(["psnr", "ssim"], ascending=False).reset_index(drop=True)
    runs["rank"] = np.arange(1, len(runs) + 1)
    if baselines and len(results):
        runs = pd.concat([runs, baseline_rows(results).assign(rank=0)], ignore_index=True)
        runs = runs.sort_values(["psnr", "ssim"], ascending=False, kind="stable").reset_index(drop=True)
    return runs[["rank", *[c for c in runs.columns if c != "rank"]]]


def write_leaderboard(board: pd.DataFrame, out_dir: str | Path, title: str = "featinv study") -> tuple[Path, Path]:
    """Write ``leaderboard.csv`` and ``leaderboard.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "leaderboard.csv", out_dir / "leaderboard.md"
    board.to_csv(csv_path, index=False)
    runs = board[board["rank"] > 0]
    improving = int(runs["still_improving"].fillna(False).astype(bool).sum()) if "still_improving" in runs else 0
    lines = [f"# {title}", "",
             f"{len(runs)} runs, ranked by test PSNR, with each tap's non-learned baselines (rank —) on the "
             f"same test images. Encoder weights: {', '.join(sorted(set(map(str, runs['weights']))))}.", "",
             f"Budget per run: {_budget(runs)}. Runs marked ↑ were still improving when their budget ran out "
             f"(best epoch = last epoch): {improving} of {len(runs)}. `vs thumbnail` is the PSNR margin over the "
             "thumbnail at the tap's grid (> 0: the features give away more than an h×w colour thumbnail).", "",
             "| rank | tap or fusion | decoder | PSNR (dB) | vs thumbnail | SSIM | LPIPS | weights | decoder params "
             "| samples seen | train time (s) |",
             "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in board.itertuples():
        lines.append(" | ".join([
            f"| {r.rank or '—'}", r.tap_or_fusion, r.decoder + (" ↑" if _true(getattr(r, "still_improving", None)) else ""),
            f"{r.psnr:.2f}", _fmt(getattr(r, "psnr_over_thumbnail", None), "+.2f"), f"{r.ssim:.3f}",
            _fmt(getattr(r, "lpips", None), ".3f", "n/a" if r.rank else ""), str(r.weights),
            _fmt(getattr(r, "decoder_params", None), ",.0f"), _fmt(getattr(r, "samples_seen", None), ",.0f"),
            _fmt(getattr(r, "train_seconds", None), ".0f")]) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _budget(runs: pd.DataFrame) -> str:
    def span(column: str, unit: str, fmt: str) -> str:
        values = runs[column].dropna() if column in runs else pd.Series(dtype=float)
        if values.empty:
            return f"{unit} unknown"
        low, high = values.min(), values.max()
        return f"{low:{fmt}} {unit}" if low == high else f"{low:{fmt}}–{high:{fmt}} {unit}"

    return f"{span('samples_seen', 'samples seen', ',.0f')}, {span('train_seconds', 's of training', '.0f')}"


def _true(value) -> bool:
    return value is not None and not pd.isna(value) and bool(value)


def _fmt(value, fmt: str, missing: str = "") -> str:
    return missing if value is None or pd.isna(value) else format(value, fmt)


def best_runs_figure(board: pd.DataFrame, checkpoints_root: str | Path, images_path: str | Path,
                     features_dir: str | Path, out: str | Path, top: int = 4, n_images: int = 3) -> Path:
    """The best ``top`` runs side by side on the same test images (same rendering as evaluation)."""
    from featinv.evaluation.evaluate import _stores_of, predict_split
    from featinv.data.image_store import ImageStore
    from featinv.evaluation.metrics import image_metrics
    from featinv.training.model import load_checkpoint
    from featinv.evaluation.render import comparison_rows, save_png, side_by_side

    images = ImageStore(images_path)
    picks = None
    preds_by_run = []
    targets = None
    for r in board[board["rank"] > 0].head(top).itertuples():  # runs only, not the baseline rows
        run = StudyRun(ENSEMBLE if r.tap_or_fusion.startswith(ENSEMBLE + "-") else r.tap_or_fusion,
                       r.tap_or_fusion.split("-", 1)[1] if r.tap_or_fusion.startswith(ENSEMBLE + "-") else None,
                       r.decoder)
        model, meta = load_checkpoint(run_dir(checkpoints_root, run) / "best.pt")
        preds, targets = predict_split(model, _stores_of(meta, features_dir), images, "test", torch.device("cpu"))
        preds_by_run.append((f"#{r.rank}", f"#{r.rank} {run.label} + {run.decoder}", preds))
    assert targets is not None, "empty leaderboard"
    picks = np.linspace(0, targets.shape[0] - 1, num=min(n_images, targets.shape[0])).round().astype(int)
    rows = []
    for i in dict.fromkeys(picks.tolist()):
        target = targets[i].permute(1, 2, 0).numpy()
        best_tag, _, best = preds_by_run[0]
        extra = [(tag, p[i].clamp(0, 1).permute(1, 2, 0).numpy()) for tag, _, p in preds_by_run[1:]]
        scores = [image_metrics(targets[i : i + 1], p[i : i + 1])[0]["psnr"] for _, _, p in preds_by_run]
        rows.append(side_by_side(target, best[i].clamp(0, 1).permute(1, 2, 0).numpy(),
                                 f"{images.ids('test')[i]}: PSNR " + " / ".join(f"{s:.2f}" for s in scores)
                                 + " dB (difference map: #1)", extra=extra, recon_label=best_tag))
    title = "best runs: " + " | ".join(label for _, label, _ in preds_by_run)
    return save_png(comparison_rows(rows, title=title), out)


def depth_figure(rows: list[dict], out: str | Path, title: str = "How much does each tap give away?") -> Path:
    """PSNR per tap ordered by depth: best decoder-only vs refined, as a grouped bar chart.

    Args:
        rows: dicts with ``tap``, ``psnr_decoder`` and optionally ``psnr_refined`` and ``thumbnail``
            (the PSNR of the thumbnail at the tap's grid, drawn as a reference line over the tap's bars).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featinv.encoders.taps import TAPS, resolve_tap

    def depth_key(tap: str) -> tuple:
        spec = resolve_tap(tap) if (tap in TAPS or tap.startswith("timm:")) else None
        # Depth proxy: spatial downsampling first, then the family's own order.
        return (224 // spec.height if spec else 99, spec.depth if spec else 99, tap)

    rows = sorted(rows, key=lambda r: depth_key(r["tap"]))
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4), dpi=120)
    ax.bar(x - 0.2, [r["psnr_decoder"] for r in rows], 0.4, label="decoder only")
    refined = [r.get("psnr_refined") for r in rows]
    if any(v is not None for v in refined):
        ax.bar(x + 0.2, [v or 0 for v in refined], 0.4, label="decoder + feature-matching refinement")
        for i, v in enumerate(refined):
            if v is None:  # refinement did not beat the decoder on validation: it is off for this tap
                ax.text(x[i] + 0.2, 1, "off", ha="center", va="bottom", fontsize=8, rotation=90)
    thumbs = [(i, r["thumbnail"]) for i, r in enumerate(rows) if r.get("thumbnail") is not None]
    for k, (i, value) in enumerate(thumbs):  # the reference each tap must beat to give away more than its grid
        ax.hlines(value, x[i] - 0.45, x[i] + 0.45, colors="black", linestyles="--", linewidth=1.5,
                  label="thumbnail at the tap's grid (area down, bicubic up)" if k == 0 else None)
    ax.set_xticks(x, [r["tap"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("test PSNR (dB)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
