"""`imagic-lite batch`: many (photo, prompt) jobs from a CSV or JSON Lines file, sharded by index over the
processes `accelerate launch` (or torchrun) starts; each process loads the model once and resets the UNet between jobs.

Each process appends one JSON line per finished job to its own file under DIR/.batch/; the main process merges
them into DIR/summary.jsonl as they arrive (it alone writes it) and adds summary.csv at the end. A job's folder
is complete when its run.json (written last) and bundle load; a rerun skips those and resumes the others.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ImagicError, InputError, Interrupted, OutputError
from .files import write_text_atomic

COLUMNS = ("image", "prompt", "etas", "seeds", "preset", "tune_steps", "embed_steps", "name")
REQUIRED = ("image", "prompt")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED = {"summary.jsonl", "summary.csv"}
STATE_DIR = ".batch"  # per-process summary lines and end markers
POLL_SECONDS = 1.0
CSV_FIELDS = ("index", "name", "status", "exit_code", "error", "image", "prompt", "seconds_total", "seconds_A",
              "seconds_B", "seconds_C", "peak_bytes", "auto_eta", "out", "process")

Events = Callable[[dict[str, Any]], None]


def _no_events(_: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class Job:
    """One row of the jobs file, validated; `image` is resolved against the jobs file's folder."""

    index: int
    row: int  # line in the file, for messages
    name: str
    image: Path
    prompt: str
    etas: tuple[float, ...] | None = None
    seeds: tuple[int, ...] | None = None
    preset: str | None = None
    tune_steps: int | None = None
    embed_steps: int | None = None

    def overrides(self, base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The batch's flag table with this job's own columns on top."""
        table = {section: dict(values) for section, values in base.items()}
        own = {("sample", "etas"): self.etas, ("sample", "seeds"): self.seeds, ("tune", "steps"): self.tune_steps,
               ("embed", "steps"): self.embed_steps}
        for (section, key), value in own.items():
            if value is not None:
                table.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
        return table


@dataclass(frozen=True)
class BatchSettings:
    """The flags `run` takes, shared by every job (a job's columns override some of them)."""

    model: str
    preset: str | None = None
    vram: str | None = None
    device: str | None = None
    config_file: str | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune_lr: float | None = None
    seed: int = 0
    thumbnail: bool = True
    overwrite: bool = False  # redo jobs whose folders already hold a complete result
    auto_eta: Any = False  # `--auto-eta`: False, or the eta.AutoEtaSettings every job's choice uses


# ---------------------------------------------------------------------------------------------------------------
# The jobs file: every row checked before any training, one line per problem


def read_jobs(path: Path, settings: BatchSettings) -> list[Job]:
    """Parse and validate the jobs file; raise InputError listing every bad row (a missing image or an empty prompt
    is not one: that job fails when its turn comes, as `run` would)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the jobs file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows, problems = (_jsonl_rows if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows)(text)
    jobs: list[Job] = []
    for line, row in rows:
        job = _job(len(jobs), line, row, path.parent, settings, problems)
        if job is not None:
            jobs.append(job)
    names = [j.name for j in jobs]
    for job in jobs:
        if job.name and names.count(job.name) > 1 and names.index(job.name) != job.index:
            problems.append(f"row {job.row}: name {job.name!r} is used by an earlier row; give each job its own name")
    if not rows and not problems:
        problems.append("no jobs: the file has no rows")
    if problems:
        listed = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise InputError(f"{path}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(listed))
    return _default_names(jobs)


def _csv_rows(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    problems = _header_problems(header)
    if problems:
        return [], problems
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row:
            problems.append(f"row {reader.line_num}: more values than columns")
            continue
        values = {k: v.strip() for k, v in row.items() if v is not None and v.strip() != ""}
        if values:
            rows.append((reader.line_num, values))
    return rows, problems


def _jsonl_rows(text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problems.append(f"row {number}: not valid JSON")
            continue
        if not isinstance(row, dict):
            problems.append(f"row {number}: not a JSON object")
            continue
        unknown = sorted(set(row) - set(COLUMNS))
        missing = [k for k in REQUIRED if k not in row]
        if unknown or missing:
            problems.append(f"row {number}: " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)} (known: {', '.join(COLUMNS)})"] if unknown else [])
                + ([f"missing {', '.join(missing)}"] if missing else [])))
            continue
        rows.append((number, {k: v for k, v in row.items() if v is not None}))
    return rows, problems


def _header_problems(header: list[str]) -> list[str]:
    problems = []
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        known = ', '.join(COLUMNS)
        problems.append(f"row 1: unknown column(s) {', '.join(repr(h) for h in unknown)} (known: {known})")
    missing = [h for h in REQUIRED if h not in header]
    if missing:
        problems.append(f"row 1: the header lacks {', '.join(missing)} (a CSV needs a header like image,prompt)")
    if len(set(header)) != len(header):
        problems.append("row 1: a column is named twice")
    return problems


def _job(index: int, line: int, row: dict[str, Any], folder: Path, settings: BatchSettings,
         problems: list[str]) -> Job | None:
    """One row to a Job, appending a line per bad value; its settings are resolved as `run` would, without loading."""
    from .api import check_settings

    found: list[str] = []
    image, prompt = row.get("image"), row.get("prompt", "")
    if not isinstance(image, str) or not image.strip():
        found.append("image must be a file path")
    if not isinstance(prompt, str):
        found.append("prompt must be text")
    values = {
        "etas": _numbers(row.get("etas"), float, "etas", found),
        "seeds": _numbers(row.get("seeds"), int, "seeds", found),
        "tune_steps": _count(row.get("tune_steps"), "tune_steps", found),
        "embed_steps": _count(row.get("embed_steps"), "embed_steps", found),
    }
    preset = row.get("preset")
    if preset is not None and not isinstance(preset, str):
        found.append("preset must be a preset name")
    name = row.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED):
        found.append(f"name {str(name)[:40]!r} must be 1-100 letters, digits, '.', '_' or '-', not starting with "
                      "a dot (it names the job's folder)")
    if values["seeds"] and min(values["seeds"]) < 0:
        found.append("seeds must be >= 0")
    job = None
    if not found:
        path = Path(image).expanduser()
        job = Job(index=index, row=line, name=name or "", image=path if path.is_absolute() else folder / path,
                  prompt=prompt, preset=preset, **values)
        try:
            check_settings(settings.model, preset or settings.preset, settings.vram, settings.device,
                           settings.config_file, job.overrides(settings.overrides), settings.tune_lr)
        except ImagicError as exc:
            found.append(str(exc))
    problems += [f"row {line}: {p}" for p in found]
    return None if found else job


def _numbers(value: Any, kind: type, name: str, found: list[str]) -> tuple | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        numbers = tuple(kind(x) if isinstance(x, str) else x for x in items if not isinstance(x, str) or x.strip())
        if not numbers or not all(type(x) in ((int,) if kind is int else (int, float)) for x in numbers):
            raise ValueError
    except ValueError:
        example = "0.6,0.7,0.8" if kind is float else "0,1,2"
        found.append(f"{name} takes comma-separated numbers like {example}; got {str(value)[:40]!r}")
        return None
    return tuple(kind(x) for x in numbers)


def _count(value: Any, name: str, found: list[str]) -> int | None:
    if value is None:
        return None
    try:
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    except ValueError:
        number = None
    if type(number) is not int or number < 1:
        found.append(f"{name} must be a whole number >= 1; got {str(value)[:40]!r}")
        return None
    return number


def _default_names(jobs: list[Job]) -> list[Job]:
    """A job without a name is named after its image; a repeated image stem gets the row's index appended."""
    from dataclasses import replace

    explicit = {j.name for j in jobs if j.name}
    stems = [_stem(j.image) for j in jobs]
    named = []
    for job, stem in zip(jobs, stems, strict=True):
        if not job.name:
            unique = stems.count(stem) == 1 and stem not in explicit
            job = replace(job, name=stem if unique else f"{stem}-{job.index + 1}")
        named.append(job)
    return named


def _stem(image: Path) -> str:
    """The file stem `run` uses for a photo's outputs."""
    return image.stem.replace(".", "_") or "image"


# ---------------------------------------------------------------------------------------------------------------
# Running: shard, skip what is complete, one model per process, a summary line per job


@dataclass
class Totals:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.skipped


def process_state():
    """accelerate's view of the launch: ranks 0..N-1 under `accelerate launch`/torchrun, rank 0 of 1 otherwise.
    cpu=True on a machine without CUDA is what makes a multi-process CPU launch use gloo (FIELD-NOTES §5)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_batch(jobs: list[Job], out: Path, settings: BatchSettings, *, state, stop, events: Events = _no_events
              ) -> list[dict[str, Any]]:
    """Run this process's share of `jobs` into `out`; on the main process also wait for the others and return every
    job's summary line (other processes return their own). Raises Interrupted when `stop` is set."""
    rank, world = state.process_index, state.num_processes
    shared = out / STATE_DIR
    if state.is_main_process:
        _prepare(out, shared, world)
    state.wait_for_everyone()  # nobody writes a summary line before the main process cleared the old ones
    mine = jobs[rank::world]
    events({"kind": "start", "total": len(jobs), "processes": world})
    runner = _Runner(settings, state, stop, events, out, shared / f"rank-{rank}.jsonl")
    if state.is_main_process:
        runner.watch = _Watcher(out, shared, jobs, world, events)
    for job in mine:
        if stop.is_set():
            raise Interrupted("stopped between jobs; rerun the same command to continue")
        runner.one(job)
    (shared / f"rank-{rank}.finished").touch()
    if not state.is_main_process:
        return runner.lines
    return runner.watch.until_all_finished(stop)


def _prepare(out: Path, shared: Path, world: int) -> None:
    from .outputs import prepare_out_dir

    prepare_out_dir(out, overwrite=True)  # writable; a batch's DIR is reused by reruns by design
    shared.mkdir(parents=True, exist_ok=True)
    for old in shared.glob("rank-*"):
        old.unlink()


class _Runner:
    """One process's loop: skip complete jobs, load the model at the first job that needs it, record each job."""

    def __init__(self, settings: BatchSettings, state, stop, events: Events, out: Path, lines_file: Path) -> None:
        self.settings, self.state, self.stop, self.events, self.out = settings, state, stop, events, out
        self.lines_file = lines_file
        self.lines: list[dict[str, Any]] = []
        self.imagic = None
        self.chosen = None  # the batch's preset (flags as for `run`), chosen once per process
        self.choose_notes: list[str] = []
        self.watch: _Watcher | None = None

    def one(self, job: Job) -> None:
        folder = self.out / job.name
        started = time.perf_counter()
        if not self.settings.overwrite and complete(folder, job):
            line = _line(job, "skipped", folder, self.state.process_index)
        else:
            self.events({"kind": "job", "name": job.name, "index": job.index})
            line = self._attempt(job, folder)
        line["wall_seconds"] = round(time.perf_counter() - started, 3)
        self._record(line)

    def _attempt(self, job: Job, folder: Path) -> dict[str, Any]:
        try:
            report = self._fit(job, folder)
        except Interrupted as exc:  # `run`'s hint (--resume, edit) does not apply: the same batch command continues
            what = str(exc).split(";")[0]
            raise Interrupted(f"job {job.name}: {what}; rerun the same command to continue") from None
        except ImagicError as exc:
            return _line(job, "failed", folder, self.state.process_index, exc.exit_code, str(exc))
        except Exception as exc:  # the batch goes on; the line says how to see more
            return _line(job, "failed", folder, self.state.process_index, 1,
                         f"internal error ({type(exc).__name__}: {str(exc)[:300]}); rerun the job with "
                         "`imagic-lite --debug run` for a traceback")
        line = _line(job, "done", folder, self.state.process_index)
        stages = [r for r in report["stages"] if r["stage"] != "load"]  # the process's one load is no job's time
        line["seconds"] = {r["stage"]: round(r["seconds"], 3) for r in stages}
        line["peak_bytes"] = {r["stage"]: r["peak"].get("peak_bytes") for r in stages if r["peak"]}
        if "auto_eta" in report:
            line["auto_eta"] = report["auto_eta"]["eta"]
        return line

    def _fit(self, job: Job, folder: Path) -> dict[str, Any]:
        from .images import load_image
        from .outputs import fit_and_write

        if not job.prompt.strip():
            raise InputError('the prompt is empty; describe the edited image, e.g. "a dog lying down"')
        loaded = load_image(job.image)
        settings = self._settings(job)
        imagic = self._model(job, settings)
        imagic.preset = settings
        imagic.records = list(self.load_records)
        imagic.notes = list(loaded.notes) + list(self.load_notes)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").unlink(missing_ok=True)  # a stale run.json would mark a half-rewritten folder done

        def progress(event: dict[str, Any]) -> None:
            self.events({**event, "kind": "stage", "name": job.name})
            if self.watch is not None:
                self.watch.poll()

        report, _ = fit_and_write(imagic, loaded.image, job.prompt, _stem(job.image), folder, seed=self.settings.seed,
                                  resume=True, thumbnail=self.settings.thumbnail, progress=progress, stop=self.stop,
                                  auto_eta=self.settings.auto_eta)
        return report

    def _device(self) -> str | None:
        s = self.settings
        return s.device or (str(self.state.device) if self.state.device.type == "cuda" else None)

    def _batch_preset(self):
        """The preset the batch's flags name (--preset, --vram), chosen once per process for its device."""
        if self.chosen is None:
            from .api import choose_preset
            from .models import pick_device

            s = self.settings
            self.chosen, self.choose_notes = choose_preset(s.preset, s.vram, pick_device(self._device()), s.model)
        return self.chosen

    def _model(self, job: Job, settings):
        """The model loaded with the job's memory settings: at the first job that needs it (a rerun of finished jobs
        never loads it), and again only when a job's preset needs other ones (dtype, quantized storage, offload) than
        the model in memory. Jobs keep their order, so a jobs file grouped by preset loads least often."""
        if self.imagic is not None and self.imagic.preset.memory == settings.memory:
            return self.imagic
        from .api import Imagic
        from .bench import free_device_memory
        from .config import load_preset

        s = self.settings
        reloading = self.imagic is not None
        if reloading:  # one model at a time on the device: let the old one go before loading the next
            device, self.imagic = self.imagic.components.device, None
            free_device_memory(device)
        preset = load_preset(job.preset) if job.preset else self._batch_preset()
        self.imagic = Imagic.from_pretrained(s.model, preset, device=self._device(), config_file=s.config_file,
                                             overrides=job.overrides(s.overrides), tune_lr=s.tune_lr)
        self.load_records = list(self.imagic.records)
        self.load_notes = self.choose_notes + list(self.imagic.notes)
        if reloading:
            self.load_notes.append(f"the batch loaded the model again for this job: preset {preset.name} needs other "
                                   "memory settings than the previous job's (group jobs by preset to load less often)")
        return self.imagic

    def _settings(self, job: Job):
        """The job's settings exactly as `run` with the same flags would resolve them."""
        from .api import resolve_settings
        from .config import load_preset
        from .models import resolve_model

        s = self.settings
        chosen = load_preset(job.preset) if job.preset else self._batch_preset()
        return resolve_settings(resolve_model(s.model), chosen, s.config_file, job.overrides(s.overrides),
                                tune_lr=s.tune_lr)

    def _record(self, line: dict[str, Any]) -> None:
        """Append one whole line to this process's file (flushed and synced: the main process reads it live)."""
        self.lines.append(line)
        with open(self.lines_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.watch is not None:
            self.watch.poll(force=True)


def _line(job: Job, status: str, folder: Path, process: int, exit_code: int = 0, error: str = "") -> dict[str, Any]:
    return {"index": job.index, "name": job.name, "image": str(job.image), "prompt": job.prompt, "status": status,
            "exit_code": exit_code, "error": error, "seconds": {}, "peak_bytes": {}, "out": str(folder),
            "process": process}


def complete(folder: Path, job: Job) -> bool:
    """A finished result for this job: run.json (written last) for the same prompt, its images, a bundle that loads."""
    from .bundle import load_bundle

    try:
        report = json.loads((folder / "run.json").read_text())
        # by name inside the folder: the recorded paths are relative to wherever the first run started
        if report.get("prompt") != job.prompt or not all((folder / Path(f).name).is_file() for f in report["outputs"]):
            return False
        load_bundle(folder / Path(report["bundle"]).name)
    except (OSError, ValueError, KeyError, TypeError, ImagicError):
        return False
    return True


class _Watcher:
    """The main process's view of every process: it reads their line files, keeps summary.jsonl current (it alone
    writes it) and reports the overall counts."""

    def __init__(self, out: Path, shared: Path, jobs: list[Job], world: int, events: Events) -> None:
        self.out, self.shared, self.jobs, self.world, self.events = out, shared, jobs, world, events
        self.last = 0.0
        self.seen = -1

    def lines(self) -> list[dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for rank in range(self.world):
            path = self.shared / f"rank-{rank}.jsonl"
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            for raw in text.splitlines(keepends=True):
                if raw.endswith("\n"):  # a line still being written is read next time
                    line = json.loads(raw)
                    found[line["index"]] = line
        return [found[i] for i in sorted(found)]

    def poll(self, force: bool = False) -> list[dict[str, Any]] | None:
        if not force and time.monotonic() - self.last < POLL_SECONDS:
            return None
        self.last = time.monotonic()
        lines = self.lines()
        if len(lines) != self.seen:
            self.seen = len(lines)
            write_text_atomic(self.out / "summary.jsonl", "".join(json.dumps(x, default=str) + "\n" for x in lines))
            totals = Totals(len(self.jobs))
            for line in lines:
                setattr(totals, line["status"], getattr(totals, line["status"]) + 1)
            self.events({"kind": "totals", "totals": totals})
        return lines

    def until_all_finished(self, stop) -> list[dict[str, Any]]:
        while not all((self.shared / f"rank-{r}.finished").is_file() for r in range(self.world)):
            if stop.is_set():
                raise Interrupted("stopped while waiting for the other processes; rerun the same command to continue")
            self.poll()
            time.sleep(0.2)
        lines = self.poll(force=True) or self.lines()
        write_summary_csv(self.out / "summary.csv", lines)
        return lines


def write_summary_csv(path: Path, lines: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for line in lines:
        seconds, peaks = line.get("seconds") or {}, [v for v in (line.get("peak_bytes") or {}).values() if v]
        writer.writerow({**line, "seconds_total": round(sum(seconds.values()), 3) if seconds else "",
                         **{f"seconds_{s}": seconds.get(s, "") for s in "ABC"},
                         "peak_bytes": max(peaks) if peaks else ""})
    try:
        write_text_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
