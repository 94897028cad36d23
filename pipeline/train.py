"""DVC stage `train`: train the decoder from cached features; per-epoch curves go to dvclive."""

from dvclive import Live

from featinv.training.train import train_decoder
from pipeline.common import config, parser, run


class _DvcliveLogger:
    """Adapts the library's EpochLogger callback to dvclive."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", required=True)
    p.add_argument("--features", required=True, help="directory of feature stores")
    p.add_argument("--out", required=True, help="checkpoint directory (best.pt, last.pt)")
    p.add_argument("--live", required=True, help="dvclive directory (metrics + plots)")
    args = p.parse_args()
    cfg = config(args)
    # Metrics/plots are declared in dvc.yaml, so dvclive must not edit it or make its own experiment.
    with Live(dir=args.live, dvcyaml=False, save_dvc_exp=False) as live:
        result = train_decoder(cfg, args.images, args.features, args.out, logger=_DvcliveLogger(live))
        for key in ("best_val_loss", "best_epoch", "epochs_run", "train_seconds", "decoder_params"):
            live.summary[key] = getattr(result, key)
        live.summary["stopped"] = result.stopped


if __name__ == "__main__":
    run(main)
