"""The launcher's progress display: a bar with the current metric on a terminal, one line per round otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar


class Progress:
    """A progress bar with the current metric on a terminal, one line per round otherwise."""

    def __init__(self, total: int, metric: str | None = None) -> None:
        self.console = Console(stderr=True)
        self.total, self.metric = total, metric
        self.bar = None
        if self.console.is_terminal:
            self.bar = Bar(
                TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metric]}"), TimeElapsedColumn(), console=self.console,
            )
            self.task = self.bar.add_task("rounds", total=total, metric="starting the fleet")
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        sv = row["server"]
        key = self.metric or next((k for k in sv if k != "num-examples"), None)
        metric = f"{key} {sv[key]:.3f}" if key in sv else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=row["round"], metric=metric)
        else:
            label = "initial model" if row["round"] == 0 else f"round {row['round']}/{self.total}"
            self.console.print(f"{label}: {metric} ({row['time']:.1f}s)", highlight=False)

    def note(self, message: str) -> None:
        """One line the user must see now (a gateway that failed), above the bar if there is one."""
        (self.bar.console if self.bar is not None else self.console).print(f"! {message}", highlight=False,
                                                                           markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
