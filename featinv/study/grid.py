"""The study's grid: every tap × decoder, and every fusion × decoder, as cells.

Running the grid is DVC's job (matrix stages in ``study/dvc.yaml``, or one Dask task per stage
through :mod:`featinv.study.executors`); the library never touches DVC.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from featinv.config import Config
from featinv.training.model import ENSEMBLE

__all__ = ["StudyRun", "plan_runs", "run_dir"]


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One cell of the study grid."""

    encoder: str  # a tap, or "ensemble"
    fusion: str | None
    decoder: str

    @property
    def label(self) -> str:
        """``vgg16/block1`` or ``ensemble-concat``: the run's tap or fusion."""
        return self.encoder if self.fusion is None else f"{ENSEMBLE}-{self.fusion}"

    def to_dict(self) -> dict:
        return {"encoder": self.encoder, "fusion": self.fusion, "decoder": self.decoder}


def plan_runs(cfg: Config) -> list[StudyRun]:
    """The study's runs: ``study.taps`` × ``study.decoders`` + ``study.fusions`` × ``study.decoders``."""
    taps = cfg.study.taps or cfg.taps
    runs = [StudyRun(t, None, d) for t in taps for d in cfg.study.decoders]
    runs += [StudyRun(ENSEMBLE, f, d) for f in cfg.study.fusions for d in cfg.study.decoders]
    return runs


def run_dir(root: str | Path, run: StudyRun) -> Path:
    """Where a run's files live under ``root`` (``<root>/<tap or ensemble-fusion>/<decoder>``)."""
    return Path(root) / run.label / run.decoder
