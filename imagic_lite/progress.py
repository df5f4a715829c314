"""Progress displays: the CLI's rich bars, and `StageLog`, the same events kept as data for the web page.

Stages report through a callback with a dict (k-diffusion style); only this module turns events into displays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StageLine:
    """The latest event of one stage, with what the CLI's bar shows beside it."""

    stage: str
    step: int
    total: int
    loss: float | None
    rate: float | None  # steps per second since the stage's first event (None until two events)
    memory: str


class StageLog:
    """A progress callback that keeps the latest line per stage, for a display that polls (the web page).

    It is called from the worker thread that runs the stages; a reader takes `lines` (replaced, never mutated)."""

    def __init__(self) -> None:
        self.lines: dict[str, StageLine] = {}
        self.version = 0  # bumped on every event, so a poller can tell whether anything changed
        self._first: dict[str, tuple[float, int]] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        stage, step = event["stage"], event["step"]
        start, first_step = self._first.setdefault(stage, (now, step))
        rate = (step - first_step) / (now - start) if now > start and step > first_step else None
        line = StageLine(stage, step, event["total"], event.get("loss"), rate, _peak_memory())
        self.lines = {**self.lines, stage: line}
        self.version += 1
