"""A rich progress bar for training and inference loops that shows live figures."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """Yield ``update(n=1, **figures)``: advances the bar and shows the figures beside it.

    Example::

        with progress_bar(100, "train") as update:
            for step in range(100):
                update(loss=f"{loss:.3f}")
    """
    if not enabled:
        yield lambda n=1, **figures: None
        return
    console = Console(file=sys.stderr)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[figures]}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, figures="")

        def update(n: int = 1, **figures) -> None:
            text = "  ".join(f"{k} {v}" for k, v in figures.items())
            bar.update(task, advance=n, figures=text)

        yield update
