"""DVC stage `prepare`: source images → data/prepared/images.zarr (uint8 pixels + ids per split)."""

from featinv.console import progress_bar
from featinv.data.image_store import prepare_images
from pipeline.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="image store to write")
    args = p.parse_args()
    cfg = config(args)
    with progress_bar("prepare images") as progress:
        prepare_images(cfg.data, cfg.seed, args.out, progress=progress)


if __name__ == "__main__":
    run(main)
