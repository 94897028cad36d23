"""Named bundles of param overrides: ``featinv preset NAME`` prints them for ``dvc exp run``.

One definition serves the CLI, the docs and the benchmarks (``benchmarks/quality.py``
trains featinv's decoder with the ``local_mlp`` preset and tries ``deep_refine`` among its
refinement candidates), so they cannot drift apart.
"""

from __future__ import annotations

from featinv.errors import UnknownNameError

__all__ = ["PRESETS", "preset_overrides"]

PRESETS: dict[str, dict[str, object]] = {
    # The published study's protocol (DIV2K, ImageNet weights, its loss and schedule).
    "paper": {
        "data.source": "div2k",
        "extract.weights": "imagenet",
        # The published study fed every encoder ImageNet mean/std, ViT-S (trained with 0.5/0.5) too.
        "extract.normalisation": "imagenet",
        "train.loss.mse": 0.5,
        "train.loss.lpips": 0.5,
        "train.lr": 0.0001,
        "train.batch_size": 4,
        "train.scheduler": "plateau",
        "train.plateau_patience": 5,
        "train.early_stop_patience": 15,
        "train.epochs": 30,
    },
    # featinv's best single-tap decoder and its recipe: 2,048 independent 3×3 feature windows
    # per step (one position each), MSE, warm-up + cosine; an "epoch" is 200 such steps.
    "local_mlp": {
        "decoder": "local_mlp",
        "train.batch_size": 2048,
        "train.feature_crop": 1,
        "train.samples_per_epoch": 409600,
        "train.lr": 0.001,
        "train.scheduler": "cosine",
        "train.loss.mse": 1.0,
        "train.loss.lpips": 0.0,
        "train.epochs": 30,
        # Windows are gathered from RAM; streaming would read a whole map per window.
        # VGG-16 block1 at DIV2K scale (2,560 views) is 4.1 GB of float16.
        "train.ram_cache_gb": 8,
        # The MLP in bf16 (its ridge path stays float32): on a CPU with native bf16 each step costs
        # half, and trained vgg16/block1 reached 36.81 dB in 10 minutes where float32 reached 36.66
        # (BENCHMARKS.md, "Trained encoders"). A CPU without native bf16 trains in float32 and says so.
        "train.precision": "bfloat16",
    },
    # Refinement for deep taps, where the features leave fine detail undetermined: L-BFGS on a
    # 2× coarser correction, then one decoder back-projection (featinv.evaluation.refine explains
    # each). Chosen on the validation split of *trained* VGG-16 block3 (ImageNet weights, local_mlp):
    # it beat the mean of 4 refinements from noisy starts (21.19 vs 21.07 dB, 10 steps on 4 images, at
    # a quarter of the cost), which had won on random-weight features (BENCHMARKS.md, "Trained encoders").
    # 100 steps: 22.22 dB on those images, where 25 steps gave 21.44 and 250 fell back to 21.98
    # (past ~100 it fits detail the features do not determine); ~26 s per image on a 2-core CPU.
    # A total-variation prior (weighed against the feature loss, which is normalised by the target's
    # energy) keeps that detail out: from the weight-decayed decoder (20.75 dB on those images), tv 0
    # reached 22.80, 0.15 23.10, 1.0 23.51, 2.5 23.33 in 100 steps. With the prior, more steps no
    # longer fall back: tv 1.0 for 200 steps reached 23.82 (~52 s per image on a 2-core CPU).
    "deep_refine": {
        "evaluate.refine": 200,
        "evaluate.refine_optimizer": "lbfgs",
        "evaluate.refine_smooth": 2,
        "evaluate.refine_backproject": 1,
        "evaluate.refine_tv": 1.0,
    },
    # Refinement for shallow taps (every pixel pinned down by the features): per-pixel L-BFGS, 100
    # steps. Chosen on the validation split of trained VGG-16 block1 (bf16 local_mlp decoder,
    # 36.66 dB on 4 images): 47.62 dB where Adam lr 0.01 reached 43.15 in the same 100 steps.
    "shallow_refine": {
        "evaluate.refine": 100,
        "evaluate.refine_optimizer": "lbfgs",
        "evaluate.refine_smooth": 1,
    },
    # The published study's 44-run grid (8 taps × 4 decoders + 3 fusions × 4 decoders); the
    # default study is 8 taps × 2 decoders at a budget whose ranking is stable (params.yaml).
    "published_study": {
        "study.decoders": "[transposed_conv,frequency_aware,wavelet,attention]",
        "study.fusions": "[weighted,concat,attention]",
    },
}


def preset_overrides(name: str) -> list[str]:
    """``KEY=VALUE`` overrides of preset ``name`` (for :func:`featinv.config.with_overrides`).

    Raises:
        UnknownNameError: ``name`` is not a preset; lists the valid ones.
    """
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; valid choices: {', '.join(PRESETS)}")
    return [f"{key}={value}" for key, value in PRESETS[name].items()]
