"""What a run leaves in its output folder: one PNG per (eta, seed) with its parameters, a labelled grid, run.json.

Every file is written under a temporary name and renamed; an existing folder is only reused with --overwrite.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import OutputError
from .files import write_text_atomic


def prepare_out_dir(out: Path, *, overwrite: bool, resume: bool = False) -> Path:
    """Create `out` (or accept it) and prove it is writable before any long work starts."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise OutputError(f"--out {out} already has files; pass --overwrite to replace them or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to --out {out}: {exc.strerror or exc}; choose a writable folder") from None
    return out


def sample_name(stem: str, eta: float, seed: int) -> str:
    return f"{stem}_eta{eta:.2f}_seed{seed}.png"


def write_samples(out: Path, stem: str, samples: list, params: dict[str, Any], title: str) -> list[Path]:
    """One PNG per sample carrying its parameters, and a seeds x etas grid whose name contains `grid`."""
    from .images import make_grid, save_png

    paths = []
    for s in samples:
        path = out / sample_name(stem, s.eta, s.seed)
        save_png(path, s.image, {**params, "eta": s.eta, "seed": s.seed})
        paths.append(path)
    etas = sorted({s.eta for s in samples})
    seeds = sorted({s.seed for s in samples})
    by_key = {(s.seed, s.eta): s.image for s in samples}
    rows = [[by_key[(seed, eta)] for eta in etas] for seed in seeds]
    grid = make_grid(rows, [f"seed {s}" for s in seeds], [f"eta {e:g}" for e in etas], title=title)
    grid_path = out / f"{stem}_grid.png"
    save_png(grid_path, grid, params)
    return [*paths, grid_path]


def write_run_json(out: Path, report: dict[str, Any]) -> Path:
    path = out / "run.json"
    try:
        write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
