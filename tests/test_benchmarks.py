"""The performance suite runs end to end in quick mode and writes every figure."""

import json
import math

from benchmarks import run


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_perf_quick_writes_every_figure(tmp_path):
    out = tmp_path / "perf.json"
    run.main(["--quick", "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work")])

    perf = json.loads(out.read_text())
    assert perf["mode"] == "quick"
    assert set(perf["taps"]) == set(run.QUICK.taps)
    for tap, figures in perf["taps"].items():
        for key in ("cache_speedup", "extraction_overhead", "loader_headroom", "loader_headroom_ram"):
            assert _positive(figures[key]), (tap, key, figures[key])
        assert set(figures["store_ratio"]) == set(run.CODECS)
        assert all(_positive(r) for r in figures["store_ratio"].values()), figures["store_ratio"]
        assert 0.99 < figures["store_ratio"]["none"] < 1.1  # uncompressed: raw bytes plus chunk framing
    assert _positive(perf["study_speedup"])
    assert perf["study"]["extrapolated"] is True
    assert perf["study"]["runs"] == 44
    memory = perf["memory"]
    for mode in ("stream", "ram"):
        assert all(_positive(memory["peak_rss_mb"][mode][size]) for size in ("N", "8N"))
        assert _positive(memory["ratio_8n_over_n"][mode])
    assert memory["train_samples"]["8N"] > 3 * memory["train_samples"]["N"]
    assert set(perf["scaling"]["train_samples_per_s"]) == {str(b) for b in run.QUICK.train_batches}


def test_memory_format_benchmark_times_every_setting(tmp_path):
    from benchmarks import memory_format

    out = tmp_path / "memory_format.json"
    memory_format.main(["--shape", "8", "28", "28", "--batch", "1", "--steps", "1",
                        "--decoders", "transposed_conv", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["decoder"] == "transposed_conv" and row["fastest"] in memory_format.SETTINGS
    assert all(_positive(row[f"{s}_s"]) for s in memory_format.SETTINGS)


def test_refine_probe_refines_noisy_true_images_towards_the_clean_ones(tmp_path):
    from benchmarks import refine_probe

    out = tmp_path / "probe.json"
    refine_probe.main(["--taps", "vgg16/block1", "--steps", "3", "--images", "1", "--max-images", "5",
                       "--work", str(tmp_path / "work"), "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["tap"] == "vgg16/block1" and row["steps"] == 3 and row["images"] == 1
    assert row["feature_loss_refined"] < row["feature_loss_start"]
    assert row["psnr_refined"] > row["psnr_start"]
