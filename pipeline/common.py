"""What every stage shares: argument parsing with ``--set`` overrides, params loading, error exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from featinv.config import Config, load_params, with_overrides
from featinv.console import print_error, setup_logging
from featinv.errors import FeatinvError

PARAMS_FILE = "params.yaml"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for this run, e.g. --set decoder=wavelet (the study uses this)")
    return p


def config(args: argparse.Namespace) -> Config:
    """params.yaml with the ``--set`` overrides applied, validated."""
    return with_overrides(load_params(args.params), args.overrides)


def run(main: Callable[[], None]) -> None:
    """Run a stage; a FeatinvError becomes one clear line and exit status 1."""
    setup_logging()
    try:
        main()
    except FeatinvError as exc:
        print_error(exc)
        sys.exit(1)
