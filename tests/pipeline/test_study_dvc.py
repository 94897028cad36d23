"""`featinv study` under DVC: each tap is extracted exactly once, however many runs read it."""

import collections
import json
import re
import sys

import pytest
import yaml

from dvc_project import make_project, run_cmd

pytestmark = pytest.mark.slow

SHALLOW = ["resnet34/layer1", "vgg16/block1", "vit_small/block1", "pvt_v2_b2/stage1"]


def _stage_counts(log: str) -> collections.Counter:
    return collections.Counter(re.findall(r"Running stage '([^']+)'", log))


def _published_grid(params: dict) -> None:
    params["study"].update(decoders=["transposed_conv", "frequency_aware", "wavelet", "attention"],
                           fusions=["weighted", "concat", "attention"])


def test_published_study_plan_is_one_extract_stage_per_tap_feeding_44_runs(tmp_path):
    env = make_project(tmp_path, _published_grid)
    plan = json.loads(run_cmd([sys.executable, "-m", "featinv.cli", "study", "--plan", "--json"], tmp_path, env,
                              stdout_only=True))
    taps = yaml.safe_load((tmp_path / "params.yaml").read_text())["taps"]
    # The ensembles read the whole feature folder, so every extract stage feeds the study.
    assert sorted(plan["extract_stages"]) == sorted(f"extract@{t}" for t in taps) and len(plan["runs"]) == 44
    for stage, sources in plan["runs"].items():
        if ":run@" in stage:  # a single-tap run reads exactly its own tap's store
            tap = stage.split("@", 1)[1].rsplit("-", 1)[0]
            assert sources == [f"extract@{tap}"]
        else:  # an ensemble reads the stores, it never extracts anything itself
            assert {f"extract@{t}" for t in SHALLOW} <= set(sources)


def _mini(params: dict) -> None:
    params["taps"] = SHALLOW
    params["data"].update(max_images=6, train_views=1)
    params["study"].update(taps=SHALLOW[:2], decoders=["wavelet"], fusions=["weighted"], epochs=1,
                           samples_per_epoch=4)
    params["evaluate"].update(grid_images=1)


def test_mini_study_runs_every_run_from_the_shared_cache(tmp_path):
    env = make_project(tmp_path, _mini)
    log = run_cmd([sys.executable, "-m", "featinv.cli", "study"], tmp_path, env)
    counts = _stage_counts(log)
    assert sorted(k for k in counts if k.startswith("extract@")) == sorted(f"extract@{t}" for t in SHALLOW)
    assert all(v == 1 for v in counts.values())
    assert counts["study/dvc.yaml:ensemble@weighted-wavelet"] == 1
    import pandas as pd

    board = pd.read_csv(tmp_path / "study" / "results" / "leaderboard.csv")
    assert (board["rank"] > 0).sum() == 3
    thumbnails = board[board["decoder"].str.startswith("baseline: thumbnail_")]
    # Taps sharing a baseline share its row ("vgg16/block1, ensemble-weighted").
    assert {t for taps in thumbnails["tap_or_fusion"] for t in taps.split(", ")} == \
        {"resnet34/layer1", "vgg16/block1", "ensemble-weighted"}
    assert (tmp_path / "study" / "results" / "best_runs.png").is_file()
    shown = json.loads(run_cmd(["dvc", "metrics", "show", "--json"], tmp_path, env, stdout_only=True))
    files = {f for rev in shown.values() for f in rev.get("data", {})}
    assert sum(f.startswith("metrics/study/") for f in files) == 3

    again = _stage_counts(run_cmd([sys.executable, "-m", "featinv.cli", "study"], tmp_path, env))
    assert not any(k.startswith(("extract@", "study/dvc.yaml:run", "study/dvc.yaml:ensemble")) for k in again)
