"""The distributed study on the terminal: stages done / running / failed per worker (rich).

Presentation only, like :mod:`featinv.console`: executors report
:class:`~featinv.study.executors.base.StageEvent`\\ s through a callback and this module
draws them.  The table appears with the first event, so the local executor,
which sends none, shows nothing but DVC's own output; it is live on a terminal
and printed once, when the workers are done, elsewhere (logs, CI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from featinv.study.executors.base import StageEvent

__all__ = ["study_progress"]


@dataclasses.dataclass
class _Worker:
    running: str = ""
    done: int = 0
    failed: int = 0


@contextlib.contextmanager
def study_progress(console: Console) -> Iterator[Callable[[StageEvent], None]]:
    """A per-worker table of the study's stages; yields the ``on_event`` callback for ``StudyRequest``."""
    workers: dict[str, _Worker] = {}
    skipped: list[str] = []
    lock = threading.Lock()
    live: list[Live] = []  # started with the first event (on a terminal)
    state = {"shown": False, "ended": False}

    def table() -> Table:
        t = Table(title="featinv study on dask", title_justify="left")
        for col, just in (("worker", "left"), ("running", "left"), ("done", "right"), ("failed tries", "right")):
            t.add_column(col, justify=just)
        for name in sorted(workers, key=lambda n: (len(n), n)):
            w = workers[name]
            t.add_row(name, w.running or "-", str(w.done), str(w.failed))
        running = sum(bool(w.running) for w in workers.values())
        t.add_row("[bold]all[/]", f"{running} running" + (f", {len(skipped)} skipped" if skipped else ""),
                  str(sum(w.done for w in workers.values())), str(sum(w.failed for w in workers.values())),
                  end_section=True)
        return t

    def end() -> None:
        if state["ended"] or not state["shown"]:
            return
        state["ended"] = True
        if live:
            live[0].update(table())
            live[0].stop()
        else:
            console.print(table())

    def on_event(event: StageEvent) -> None:
        with lock:
            if event.kind == "end":
                end()
                return
            state["shown"] = True
            for w in workers.values():  # a stage runs in one place: a retry elsewhere clears the old one
                if w.running == event.stage:
                    w.running = ""
            if event.worker:
                w = workers.setdefault(event.worker, _Worker())
                if event.kind == "start":
                    w.running = event.stage
                w.done += event.kind == "done"
                w.failed += event.kind == "failed"
            if event.kind == "skipped":
                skipped.append(event.stage)
            if event.kind == "done":
                console.print(f"[green]✓[/] {event.stage} [dim]on worker {event.worker}: {event.detail}[/]",
                              highlight=False)
            elif event.kind == "failed":
                console.print(f"[red]✗[/] {event.stage} [dim]failed on worker {event.worker} (tried again while "
                              f"tries are left): {event.detail}[/]", highlight=False)
            elif event.kind == "skipped":
                console.print(f"[red]✗[/] {event.stage} [dim]{event.detail}[/]", highlight=False)
            if console.is_terminal and not state["ended"]:
                if not live:
                    live.append(Live(table(), console=console, refresh_per_second=2, transient=False))
                    live[0].start()
                live[0].update(table())

    try:
        yield on_event
    finally:
        with lock:
            end()
