"""DVC stage `extract@<tap>`: run the encoder truncated at one tap once; write its feature store."""

from featinv.console import progress_bar
from featinv.store.feature_store import extract_features
from pipeline.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tap", required=True)
    p.add_argument("--images", required=True, help="prepared image store")
    p.add_argument("--out", required=True, help="feature store to write")
    args = p.parse_args()
    cfg = config(args)
    with progress_bar(f"extract {args.tap}") as progress:
        extract_features(args.images, args.tap, args.out, cfg.extract, progress=progress)


if __name__ == "__main__":
    run(main)
