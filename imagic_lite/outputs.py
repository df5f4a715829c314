"""What a run leaves in its output folder: one PNG per (eta, seed) with its parameters, a labelled grid, run.json.

Every file is written under a temporary name and renamed; an existing folder is only reused with --overwrite.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError, OutputError
from .files import write_text_atomic


def prepare_out_dir(out: Path, *, overwrite: bool, resume: bool = False) -> Path:
    """Prove `out` can take this run's files before any long work starts, and leave the disk as it was: folders
    made for the probe are removed again (the first output creates them), so a run that fails later leaves no
    empty folder. An interrupted run's checkpoint there is pointed out; --resume without one is refused."""
    from .checkpoint import CHECKPOINT_NAME

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder")
    has_files = out.is_dir() and any(out.iterdir())
    checkpoint = out / CHECKPOINT_NAME
    if resume and not checkpoint.is_file():
        bundles = sorted(out.glob("*.imagic.safetensors")) if has_files else []
        hint = (f"; its training finished: `imagic-lite edit {bundles[0]}` samples more" if bundles
                else "; run without --resume" + (" (with --overwrite to replace its files)" if has_files else ""))
        raise InputError(f"--resume: no interrupted run to continue in --out {out} (no {CHECKPOINT_NAME}){hint}")
    if has_files and not (overwrite or resume):
        if checkpoint.is_file():
            raise OutputError(f"--out {out} holds an interrupted run: continue it with --resume (same image, prompt "
                              "and settings), or pass --overwrite to start over and discard its checkpoint")
        raise OutputError(f"--out {out} already has files; pass --overwrite to replace them or choose another folder")
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to --out {out}: {exc.strerror or exc}; choose a writable folder") from None
    finally:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return out


def sample_name(stem: str, eta: float, seed: int) -> str:
    return f"{stem}_eta{eta:.2f}_seed{seed}.png"


def write_samples(out: Path, stem: str, samples: list, params: dict[str, Any], title: str,
                  input_image=None, auto_eta: dict[str, Any] | None = None) -> list[Path]:
    """One PNG per sample carrying its parameters, and a seeds x etas grid whose name contains `grid` (with
    `input_image`, the input as the model saw it in a first column, to compare each edit with).

    With `auto_eta` (EtaChoice.to_dict()) every PNG also carries the choice and its scores (each image whether it
    is the chosen one), and the grid marks the chosen eta's column."""
    if auto_eta is not None:
        params = {**params, **auto_eta_params(auto_eta)}
    paths = [write_sample(out, stem, s, params, marked=auto_eta is not None) for s in samples]
    chosen = auto_eta["eta"] if auto_eta is not None else None
    return [*paths, write_grid(out, stem, samples, params, title, input_image, chosen=chosen)]


def auto_eta_params(auto_eta: dict[str, Any]) -> dict[str, Any]:
    """The PNG text an auto-eta choice (EtaChoice.to_dict()) adds to every image it judged."""
    return {"auto_eta": auto_eta["eta"], "auto_eta_judge": auto_eta["judge"],
            "auto_eta_scores": json.dumps(auto_eta["scores"], sort_keys=True)}


def write_sample(out: Path, stem: str, sample, params: dict[str, Any], marked: bool = False) -> Path:
    """One image with `params` plus its eta and seed (and with `marked`, whether auto-eta chose it) in PNG text."""
    from .images import save_png

    path = out / sample_name(stem, sample.eta, sample.seed)
    extra = {"auto_eta_chosen": int(sample.chosen)} if marked else {}
    save_png(path, sample.image, {**params, "eta": sample.eta, "seed": sample.seed, **extra})
    return path


def write_grid(out: Path, stem: str, samples: list, params: dict[str, Any], title: str, input_image=None,
               chosen: float | None = None) -> Path:
    """The seeds x etas grid; a (seed, eta) not sampled (the web page samples one at a time) stays white. With
    `input_image`, a first column "input" holds it (first row) beside the edits; the `chosen` eta's column is
    labelled "(auto)"."""
    from PIL import Image

    from .images import make_grid, save_png

    etas = sorted({s.eta for s in samples})
    seeds = sorted({s.seed for s in samples})
    by_key = {(s.seed, s.eta): s.image for s in samples}
    blank = Image.new("RGB", samples[0].image.size, "white")
    rows = [[by_key.get((seed, eta), blank) for eta in etas] for seed in seeds]
    columns = [f"eta {e:g}" + (" (auto)" if e == chosen else "") for e in etas]
    if input_image is not None:
        shown = input_image.convert("RGB").resize(blank.size)
        rows = [[shown if r == 0 else blank, *row] for r, row in enumerate(rows)]
        columns = ["input", *columns]
    grid = make_grid(rows, [f"seed {s}" for s in seeds], columns, title=title)
    path = out / f"{stem}_grid.png"
    save_png(path, grid, params)
    return path


def run_params(imagic, prompt: str, seed_fit: int) -> dict[str, Any]:
    """The parameters `run` writes into every PNG (eta and seed are added per image)."""
    p = imagic.preset
    return {"prompt": prompt, "model": imagic.components.model_id, "preset": p.name, "seed_fit": seed_fit,
            "sample_steps": p.sample.steps, "guidance": p.sample.guidance}


def edit_params(imagic, prompt: str, bundle_name: str, sample) -> dict[str, Any]:
    """The parameters `edit` writes into every PNG (eta and seed are added per image)."""
    return {"prompt": prompt, "model": imagic.components.model_id, "bundle": bundle_name,
            "sample_steps": sample.steps, "guidance": sample.guidance}


def write_run_json(out: Path, report: dict[str, Any]) -> Path:
    path = out / "run.json"
    try:
        write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def fit_and_write(imagic, image, prompt: str, stem: str, out: Path, *, seed: int, resume: bool, thumbnail: bool,
                  progress, stop, fitted=None, auto_eta=False) -> tuple[dict[str, Any], list[Path]]:
    """What `run` and each `batch` job do once the model is loaded: stages A and B (from the checkpoint in `out`
    with `resume`), the bundle, stage C (and with `auto_eta` the eta search), the PNGs and run.json last (so
    run.json marks a complete result). `fitted` is called between the bundle and stage C (the CLI prints the fit's
    notes there)."""
    from .bundle import save_bundle
    from .checkpoint import CHECKPOINT_NAME

    checkpoint = out / CHECKPOINT_NAME
    bundle_path = out / f"{stem}.imagic.safetensors"
    bundle = imagic.fit(image, prompt, seed=seed, progress=progress, stop=stop, checkpoint=checkpoint,
                        resume=resume, thumbnail=thumbnail)
    size = save_bundle(bundle_path, bundle, thumbnail=thumbnail)
    checkpoint.unlink(missing_ok=True)
    if fitted is not None:
        fitted()
    samples = imagic.generate(progress=progress, stop=stop, auto_eta=auto_eta)
    from .images import prepare

    c = imagic.components
    choice = imagic.eta_choice.to_dict() if imagic.eta_choice else None
    files = write_samples(out, stem, samples, run_params(imagic, prompt, seed), title=prompt,
                          input_image=prepare(image, c.native, c.multiple), auto_eta=choice)
    report = {**imagic.report(), "prompt": prompt, "input": str(image.size), "bundle": str(bundle_path),
              "bundle_bytes": size, "outputs": [str(f) for f in files]}
    run_json = write_run_json(out, report)
    return report, [bundle_path, *files, run_json]
