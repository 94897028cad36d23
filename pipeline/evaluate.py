"""DVC stage `evaluate`: test-split PSNR/SSIM/LPIPS → metrics JSON, per-image CSV, PNG grid."""

from featinv.evaluation.evaluate import evaluate_run
from pipeline.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--per-image", required=True, help="per-image CSV to write")
    p.add_argument("--grid", required=True, help="reconstruction grid PNG to write")
    args = p.parse_args()
    cfg = config(args)
    evaluate_run(args.checkpoint, args.images, args.features, cfg.evaluate,
                 args.metrics, args.per_image, args.grid, run_config=cfg)


if __name__ == "__main__":
    run(main)
