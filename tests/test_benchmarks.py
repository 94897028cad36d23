"""The performance suite runs end to end in quick mode and writes every figure."""

import json
import math

import pytest

from benchmarks import run
from benchmarks.common import NATURAL


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


def test_host_memory_benchmark_measures_the_training_step_with_and_without_the_setting(tmp_path):
    from benchmarks import host_memory

    out = tmp_path / "host_memory.json"
    host_memory.main(["--maps", "8", "--decoders", "transposed_conv", "--rounds", "1", "--warmup", "2",
                      "--steps", "2", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["decoder"], row["steps"], row["precision"]) == ("transposed_conv", 2, "float32")
    assert _positive(row["default_ms_per_step"]) and _positive(row["kept_ms_per_step"])
    if row["applied"]:  # glibc: the published decoder's step stops page-faulting its activations back in
        assert row["kept_faults_per_step"] < 0.1 * row["default_faults_per_step"]  # ~0 against ~33,000


@pytest.mark.skipif(not (NATURAL / "CBSD68").is_dir(),
                    reason=f"needs the shared photographs (CBSD68) in {NATURAL}, absent here")
def test_refine_probe_refines_noisy_true_images_towards_the_clean_ones(tmp_path):
    from benchmarks import refine_probe

    out = tmp_path / "probe.json"
    refine_probe.main(["--taps", "vgg16/block1", "--steps", "3", "--images", "1", "--max-images", "5",
                       "--work", str(tmp_path / "work"), "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["tap"] == "vgg16/block1" and row["steps"] == 3 and row["images"] == 1
    assert row["feature_loss_refined"] < row["feature_loss_start"]
    assert row["psnr_refined"] > row["psnr_start"]


def test_gpu_benchmark_dry_run_writes_every_section(tmp_path):
    """`python -m benchmarks.gpu --dry`: the GPU benchmark's every section, on the CPU at toy sizes."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    gpu.main(["--dry", "--out", str(out), "--work", str(tmp_path / "work")])

    result = json.loads(out.read_text())
    assert result["errors"] == [], {n: result["sections"][n].get("error") for n in result["errors"]}
    assert set(result["sections"]) == set(gpu.SECTIONS)
    env = result["environment"]
    assert env["device"] == "cpu" and env["torch"] and "cuda" in env and "gpu" in env
    sections = result["sections"]
    startup = sections["startup"]
    assert _positive(startup["cell_wall_seconds"]) and _positive(startup["import_seconds"]["torch"])
    assert all(_positive(r["images_per_s"]) for r in sections["extract"]["rows"])
    for row in sections["train"]["rows"]:
        assert all(_positive(row[f"cache_speedup_{p}"]) for p in gpu.PRECISIONS)
    (loader,) = sections["loader"]["rows"]
    assert _positive(loader["ram_headroom"]) and _positive(loader["stream_1_threads_samples_per_s"])
    pack = sections["pack"]  # K cells sharing the device: every window trained and was judged
    assert [(r["workers"], _positive(r["samples_per_s"]), isinstance(r["valid"], bool)) for r in pack["rows"]] == \
        [(1, True, True), (2, True, True)]
    # The study and its pack are timed with the published loss, LPIPS included (its AlexNet random
    # where the trained one is missing, and the results say which).
    for timed in (pack, sections["study"]["protocol"]):
        assert timed["loss"] == {"mse": 0.5, "lpips": 0.5} and timed["lpips_alexnet"]
    study = sections["study"]
    assert study["packed"] is None or _positive(study["packed"]["hours"])  # None: no valid pack window here
    assert study["runs"] == 44 and study["measured_runs"] == 1 and study["extrapolated"] is True
    assert _positive(study["featinv_hours"]) and _positive(study["published_over_featinv"])
    assert len(study["extract_seconds_per_tap"]) == 8
    (limit,) = sections["limit"]["rows"]
    for key in ("achieved", "limit_timed", "limit_flops", "achieved_over_limit_timed", "achieved_over_limit_flops"):
        assert _positive(limit[key]), key
    assert limit["limit_flops"] > 1 and limit["gflop_encoder_per_sample"] > 1  # VGG-16 block1: ~3.9 GFLOP
    (compiled,) = sections["compile"]["rows"]  # torch.compile vs eager, on whatever device is there
    assert _positive(compiled["eager_samples_per_s"]) and _positive(compiled["compiled_samples_per_s"])
    assert isinstance(compiled["pays"], bool)


def test_quality_weights_flag_and_rows_keyed_by_weights(tmp_path):
    """`--weights KEY=PATH` becomes a per-family weights mapping; --append keys rows by (tap, decoder, weights)."""
    from benchmarks import quality
    from featinv.encoders.taps import resolve_tap, weights_id

    assert quality.weights_setting([]) == "random"
    vgg = tmp_path / "vgg.pth"
    vgg.write_bytes(b"not really weights")
    setting = quality.weights_setting([f"vgg16={vgg}"])
    assert setting == {"vgg16": str(vgg), "default": "random"}
    trained = weights_id(resolve_tap("vgg16/block1"), setting, quality.WEIGHTS_SEED)
    assert trained.startswith("file:vgg.pth:sha256=")
    assert weights_id(resolve_tap("resnet34/layer1"), setting, quality.WEIGHTS_SEED) == quality.RANDOM_ID
    try:
        quality.weights_setting(["vgg16"])
    except ValueError as exc:
        assert "KEY=PATH" in str(exc)
    else:
        raise AssertionError("a --weights value without '=' was accepted")

    out = tmp_path / "quality.json"
    old = {"tap": "vgg16/block1", "decoder": "local_mlp", "psnr": 34.6}  # a row from before `weights`
    out.write_text(json.dumps([old, {**old, "weights": trained, "psnr": 30.0}]))
    kept = quality._previous_rows(out, [("vgg16/block1", "local_mlp", trained)])
    assert kept == [{**old, "weights": quality.RANDOM_ID}]


def test_quality_loss_flag_changes_featinvs_decoders_only():
    """`--loss l1` trains featinv's decoders on L1 (recorded per row); the published decoder keeps its recipe."""
    import argparse

    from benchmarks import quality
    from featinv.config import LossConfig

    args = argparse.Namespace(loss="l1", weight_decay=0.0, other_weight_decay=1e-5)
    assert quality.train_recipe("local_mlp", "vgg16/block1", args).loss == LossConfig(mse=0.0, l1=1.0)
    assert quality.train_recipe("local_mlp", "vgg16/block3", args).weight_decay == 1e-5
    assert quality.train_recipe("transposed_conv", "vgg16/block1", args) is quality.PUBLISHED
    args.loss = "log_mse"
    assert quality.train_recipe("local_mlp", "vgg16/block1", args).loss == LossConfig(mse=0.0, log_mse=1.0)
    args.loss = "recipe"
    assert quality.train_recipe("local_mlp", "vgg16/block1", args).loss == quality.LOCAL_MLP.loss


def test_pack_speedups_count_only_windows_whose_workers_shared_the_device():
    """A pack window whose slowest worker began counting late measured no sharing: it gives no speedup."""
    from benchmarks import gpu

    def row(decoder, workers, rate, late):
        return {"tap": "vgg16/block1", "decoder": decoder, "workers": workers, "samples_per_s": rate,
                "late_seconds": late}

    rows = [row("wavelet", 1, 400.0, 0.0), row("wavelet", 4, 1600.0, 0.1), row("wavelet", 8, 2400.0, 0.0),
            row("transposed_conv", 1, 2.0, 3.5), row("transposed_conv", 8, 3700.0, 5.6),  # warm-up spilled in
            row("attention", 1, 200.0, 0.0), row("attention", 8, 3000.0, 4.0)]
    best = gpu.pack_speedups(rows, pack_seconds=4.0)
    assert best == {"wavelet": {"workers": 8, "precision": "policy", "speedup": 6.0}}
    assert [r["valid"] for r in rows] == [True, True, True, False, False, True, False]
    assert rows[1]["speedup"] == 4.0 and rows[1]["efficiency"] == 1.0
    assert rows[4]["speedup"] is None and rows[6]["speedup"] is None

    # K cells in float32 count against one cell alone as featinv runs it (its precision policy).
    rows = [dict(row("wavelet", 1, 400.0, 0.0), precision="policy"),
            dict(row("wavelet", 1, 440.0, 0.0), precision="fp32"),
            dict(row("wavelet", 8, 2000.0, 0.0), precision="policy"),
            dict(row("wavelet", 8, 2600.0, 0.0), precision="fp32")]
    assert gpu.pack_speedups(rows, pack_seconds=4.0) == {"wavelet": {"workers": 8, "precision": "fp32",
                                                                     "speedup": 6.5}}
    assert [r["speedup"] for r in rows] == [1.0, 1.1, 5.0, 6.5]


def test_store_write_times_each_codec_with_and_without_the_empty_chunk_check(tmp_path):
    from benchmarks import store_write

    rows = store_write.main(["--shape", "4", "8", "8", "--samples", "6", "--repeats", "1",
                             "--out", str(tmp_path / "store_write.json")])
    assert [r["codec"] for r in rows] == ["zstd", "lz4", "none"]
    assert all(_positive(r["chunks_per_s_checked"]) and _positive(r["chunks_per_s_unchecked"]) for r in rows)
    assert all(_positive(r["chunks_per_s_unchecked_threads"]) for r in rows)
    assert [_positive(r.get("chunks_per_s_codec_alone")) for r in rows] == [True, True, False]  # none: no codec
    assert json.loads((tmp_path / "store_write.json").read_text())["rows"] == rows
