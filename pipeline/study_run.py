"""DVC stage `study/dvc.yaml:run@<tap>-<decoder>` (and `ensemble@…`): train then evaluate one study run.

The run's encoder/fusion/decoder/epochs arrive as `--set` overrides from the matrix.
"""

import dataclasses
from pathlib import Path

from featinv.evaluation.evaluate import evaluate_run
from featinv.training.train import train_decoder
from pipeline.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="checkpoint directory of this run")
    p.add_argument("--metrics", required=True, help="metrics JSON of this run")
    args = p.parse_args()
    cfg = config(args)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, epochs=cfg.study.epochs, samples_per_epoch=cfg.study.samples_per_epoch,
        max_minutes=cfg.study.max_minutes))
    result = train_decoder(cfg, args.images, args.features, args.out)
    metrics = Path(args.metrics)
    evaluate_run(result.best_checkpoint, args.images, args.features, cfg.evaluate, metrics,
                 metrics.with_suffix(".csv"), Path(args.out) / "reconstructions.png", run_config=cfg)


if __name__ == "__main__":
    run(main)
