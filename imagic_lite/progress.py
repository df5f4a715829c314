"""The rich display for the CLI: one bar per stage with loss, it/s, ETA and peak memory.

Stages report through a callback with a dict (k-diffusion style); only this module draws.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

STAGE_NAMES = {"A": "A  embedding", "B": "B  fine-tune", "C": "C  sampling"}


def _peak_memory() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    import psutil

    return f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB RSS"


class StageProgress:
    """A context manager whose instance is the stages' progress callback."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[memory]}"),
            console=console, disable=not enabled, transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> StageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        stage = event["stage"]
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(
                STAGE_NAMES.get(stage, stage), total=event["total"], loss="", rate="", memory="")
        task = self.tasks[stage]
        fields = {"memory": _peak_memory()}
        if "loss" in event:
            fields["loss"] = f"loss {event['loss']:.4f}"
        self.progress.update(task, completed=event["step"], **fields)
        speed = self.progress.tasks[task].speed
        if speed:
            self.progress.update(task, rate=f"{speed:5.1f} it/s")


class BatchProgress:
    """`batch` on the main process: one bar over all jobs of all processes (ETA, failures) and the current job's
    stage under it. Events come from batch.run_batch."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False,
        )
        self.jobs: TaskID | None = None
        self.stage: TaskID | None = None

    def __enter__(self) -> BatchProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = event["kind"]
        if kind == "start":
            self.jobs = self.progress.add_task("jobs", total=event["total"],
                                               info=f"{event['processes']} process(es), 0 failed")
            self.stage = self.progress.add_task("", total=None, info="")
        elif kind == "totals" and self.jobs is not None:
            t = event["totals"]
            self.progress.update(self.jobs, completed=t.finished, info=f"{t.skipped} skipped, {t.failed} failed")
        elif kind == "job" and self.stage is not None:
            self.progress.reset(self.stage, total=None, description=f"  {event['name'][:20]} loading", info="")
        elif kind == "stage" and self.stage is not None:
            stage = STAGE_NAMES.get(event["stage"], event["stage"]).split()[0]
            loss = f"loss {event['loss']:.4f}" if "loss" in event else ""
            self.progress.update(self.stage, description=f"  {event['name'][:20]} stage {stage}",
                                 total=event["total"], completed=event["step"], info=loss)
