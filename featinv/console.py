"""Terminal presentation shared by the CLI and the pipeline stages: rich logging and progress bars.

The library reports progress through ``progress(done, total)`` callbacks and
the ``logging`` module; this module is the only place that turns them into
terminal output.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["console", "setup_logging", "progress_bar", "print_error"]

console = Console(stderr=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Route featinv's log records to a rich handler on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("featinv").setLevel(level)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields the ``progress(done, total)`` callback the library expects."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_error(message: object) -> None:
    """Print an error as exactly one line on stderr, however narrow or non-interactive it is.

    Rich would wrap at 80 columns when stderr is not a terminal (CI logs, ``2>err.txt``), and read
    ``[...]`` in a message (``features[:5]``) as markup; the line is neither wrapped nor marked up.
    """
    line = " ".join(str(message).split())
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
