"""What the benchmarks share: machine description, a results directory, a table printer."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work"  # git-ignored scratch (stores, checkpoints)
NATURAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "natural"


def machine() -> dict:
    """Where a figure was measured (recorded next to every result)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.date.today().isoformat(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
    return path


def table(rows: list[dict], columns: list[str], floats: dict[str, str] | None = None) -> str:
    """A plain markdown table of ``rows``."""
    floats = floats or {}
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else (format(v, floats[c]) if c in floats and isinstance(v, (int, float)) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
