"""How far does a tap pin the image down?  Refinement started from the *true* image plus noise.

For each tap: take validation images of the quality benchmark (CBSD68 split, seed 42),
add Gaussian noise of standard deviation ``--sigma``, and refine with L-BFGS towards
the clean image's own features.  If the features determined the image, refinement
would remove the noise (PSNR rises a lot); where it barely rises, images far apart
share nearly the same features — and no refinement from a decoder's output can
recover what the features do not hold.  No decoder is involved.

    python -m benchmarks.refine_probe                       # vgg16/block1 and vgg16/block3
    python -m benchmarks.refine_probe --taps vgg16/block3 --sigma 0.03 --steps 50

Prints a table and writes benchmarks/results/refine_probe.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from benchmarks.common import NATURAL, RESULTS, WORK, machine, table, write_json
from benchmarks.quality import SEED, WEIGHTS_SEED, data_config, prepared_images
from featinv.data.image_store import ImageStore
from featinv.evaluation.metrics import image_metrics
from featinv.evaluation.refine import refine_images
from featinv.encoders.taps import build_encoder


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--taps", nargs="+", default=["vgg16/block1", "vgg16/block3"])
    p.add_argument("--sigma", type=float, default=0.03, help="noise std on pixels in [0,1]")
    p.add_argument("--steps", type=int, default=50, help="L-BFGS iterations")
    p.add_argument("--images", type=int, default=3, help="validation images used")
    p.add_argument("--max-images", type=int, default=None, help="cap on source images (smoke runs)")
    p.add_argument("--data", type=Path, default=NATURAL)
    p.add_argument("--work", type=Path, default=WORK / "quality")
    p.add_argument("--out", type=Path, default=RESULTS / "refine_probe.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    images = prepared_images(args.work, data_config(args.data, max_images=args.max_images))
    clean = torch.from_numpy(ImageStore(images).pixels("val")[: args.images]).permute(0, 3, 1, 2).float().div(255)
    noisy = (clean + args.sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(SEED))).clamp(0, 1)
    rows = []
    for tap in args.taps:
        encoder = build_encoder(tap, "random", WEIGHTS_SEED)
        with torch.no_grad():
            feats = encoder(clean).half().float()  # as cached
        refined, report = refine_images(noisy, [encoder], [feats], args.steps, optimizer="lbfgs", early_stop=False)
        before = [r["psnr"] for r in image_metrics(clean, noisy)]
        after = [r["psnr"] for r in image_metrics(clean, refined)]
        rows.append({"tap": tap, "sigma": args.sigma, "steps": report["steps"], "images": len(before),
                     "psnr_start": sum(before) / len(before), "psnr_refined": sum(after) / len(after),
                     "feature_loss_start": report["feature_loss_initial"],
                     "feature_loss_refined": report["feature_loss_final"], "seconds": round(report["seconds"], 1)})
        print(table(rows, list(rows[0]), {"psnr_start": ".2f", "psnr_refined": ".2f", "feature_loss_start": ".2e",
                                           "feature_loss_refined": ".2e"}), flush=True)
    info = machine()
    write_json(args.out, [{"machine": f"{info['cpu_count']}-core CPU, torch {info['torch']}, {info['date']}",
                           "random encoder weights": f"seed {WEIGHTS_SEED}", **r} for r in rows])
    return rows


if __name__ == "__main__":
    main()
