"""DVC stage `study/dvc.yaml:leaderboard`: rank the study's runs; write the leaderboard and figures."""

from featinv.study.grid import plan_runs
from featinv.study.leaderboard import best_runs_figure, collect_results, depth_figure, leaderboard, write_leaderboard
from pipeline.common import config, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--metrics", required=True, help="root of the runs' metrics JSON")
    p.add_argument("--runs", required=True, help="root of the runs' checkpoints")
    p.add_argument("--images", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="directory for leaderboard.{md,csv} and figures")
    args = p.parse_args()
    cfg = config(args)
    board = leaderboard(collect_results(args.metrics, plan_runs(cfg)))
    write_leaderboard(board, args.out)
    best_runs_figure(board, args.runs, args.images, args.features, f"{args.out}/best_runs.png")
    runs = board[board["rank"] > 0]
    per_tap = runs[~runs["tap_or_fusion"].str.startswith("ensemble-")].groupby("tap_or_fusion")
    rows = [{"tap": tap, "psnr_decoder": float(g["psnr_decoder_only"].max()),
             "psnr_refined": float(g["psnr"].max()) if (g["refine_steps"] > 0).any() else None,
             "thumbnail": None if g["thumbnail_psnr"].isna().all() else float(g["thumbnail_psnr"].max())}
            for tap, g in per_tap]
    depth_figure(rows, f"{args.out}/psnr_by_tap.png")


if __name__ == "__main__":
    run(main)
