"""End to end on a card: `imagic-lite run` for every preset on one model, each under its card's memory cap.

Correctness, not speed: a few steps per stage, then `--auto-eta`, on the full-size random-weight architectures
(`arch:sd15`, `arch:sdxl`). Any exception -- an OOM under the cap, a dtype the kernels refuse, a NaN -- is
reported with the preset and the stage it happened in, the remaining presets still run, and the exit code is 1. Writes
benchmarks/results/e2e-<device>-<arch>-<date>.json (each preset: ok, seconds, cap, per-stage peaks, error).
Example: python benchmarks/gpu_e2e.py --model arch:sdxl --presets 12gb,8gb --steps 2
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ALL_PRESETS = "paper,cpu,24gb,12gb,8gb,6gb,4gb"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="arch:sd15", help="arch:sd15|arch:sd21|arch:sdxl, a folder, or a hub id")
    ap.add_argument("--presets", default=ALL_PRESETS, help="comma-separated preset names")
    ap.add_argument("--steps", type=int, default=2, help="stage A and stage B steps per run")
    ap.add_argument("--sample-steps", type=int, default=2, help="stage C DDIM steps (one eta, one seed)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    ap.add_argument("--weights", choices=("fp16", "bf16", "fp32"), default=None,
                    help="force memory.weights (fp16: the path of cards without bf16, with loss scaling)")
    ap.add_argument("--no-cap", action="store_true", help="do not cap each preset at its card size (vram_gb)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs' outputs (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.sample_steps < 1:
        ap.error("--steps and --sample-steps must be >= 1")
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not args.presets:
        ap.error("--presets needs at least one name")
    return args


class StageTracker:
    """Knows which stage `imagic-lite run` is in: wraps Imagic._stage, the one place every stage passes through."""

    def __init__(self) -> None:
        from imagic_lite import api

        self.stage = "load"
        self._api, self._real = api, api.Imagic._stage
        tracker = self

        def _stage(imagic, name: str, steps: int, fn):
            tracker.stage = name
            result = tracker._real(imagic, name, steps, fn)
            tracker.stage = f"after {name}"  # saving the bundle, writing images
            return result

        api.Imagic._stage = _stage

    def close(self) -> None:
        self._api.Imagic._stage = self._real


def cache_random_builds() -> Callable[[], None]:
    """Draw an architecture's random weights once and hand each preset a copy: models._build_random seeds 0, so
    every build is the same anyway, and drawing SDXL's 3.5 B weights on the CPU takes longer than a preset's run.
    Returns the function that puts the real builder back."""
    import torch

    from imagic_lite import models

    real, cache = models._build_random, {}

    def build(path: Path, family):
        if torch.get_default_device().type != "cpu":  # the memory simulation builds on the meta device
            return real(path, family)
        key = (str(path), family.name)
        if key not in cache:
            cache[key] = real(path, family)
        return copy.deepcopy(cache[key])

    models._build_random = build
    return lambda: setattr(models, "_build_random", real)


def _photo(folder: Path) -> Path:
    """A synthetic 4:3 photo: `run` resizes it to the model's native size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (120, 130, 140))
    ImageDraw.Draw(image).ellipse((180, 100, 460, 380), fill=(220, 40, 30))
    path = folder / "photo.png"
    image.save(path)
    return path


def run_preset(args: argparse.Namespace, name: str, photo: Path, work: Path, device) -> dict[str, Any]:
    """One `imagic-lite run` in this process under the preset's cap; never raises (except Ctrl-C)."""
    from imagic_lite.bench import apply_cap, free_device_memory
    from imagic_lite.cli import main
    from imagic_lite.config import load_preset

    cap_gb = None if args.no_cap else load_preset(name).vram_gb
    cap = apply_cap(cap_gb, device)
    tracker = StageTracker()
    out = work / name
    argv = ["--debug", "run", str(photo), "a dog lying down", "--model", args.model, "--preset", name,
            "--device", str(device), "--out", str(out), "--overwrite", "--embed-steps", str(args.steps),
            "--tune-steps", str(args.steps), "--sample-steps", str(args.sample_steps), "--etas", "0.7", "--quiet",
            "--auto-eta"]  # the eta judge too: its VAE encode and base-model UNet calls on the card
    if args.weights:
        config = work / f"weights-{args.weights}.toml"
        config.write_text(f'[memory]\nweights = "{args.weights}"\n')
        argv += ["--config", str(config)]
    entry: dict[str, Any] = {"preset": name, "weights": args.weights, "cap_gb": cap_gb,
                             "cap_applied": cap["cap_applied"], "ok": False}
    start = time.perf_counter()
    try:
        try:
            main(argv)  # --debug: every exception propagates, an ImagicError too
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise RuntimeError(f"imagic-lite run exited with code {exc.code}") from None
        report = json.loads((out / "run.json").read_text())
        entry.update(ok=True, compute_dtype=report.get("compute_dtype"),
                     stages={r["stage"]: {"seconds": round(r["seconds"], 2), "peak": r.get("peak", {})}
                             for r in report["stages"]})
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the point: any failure is reported, with its stage
        entry.update(stage=tracker.stage, error=f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                     traceback=traceback.format_exc(limit=-8))
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 2)
        tracker.close()
        if cap["cap_applied"]:
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0, device)
        free_device_memory(device)
    return entry


def _failure(model: str, entry: dict[str, Any]) -> str:
    return f"!! FAILED {model} preset {entry['preset']} at stage {entry['stage']}: {entry['error']}"


def results_name(model: str, env: dict, weights: str | None = None) -> str:
    where = "cpu" if env["device"] == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower())
    arch = re.sub(r"[^A-Za-z0-9._-]+", "_", model.removeprefix("arch:"))
    arch += f"-{weights}" if weights else ""
    return f"e2e-{where.strip('-')}-{arch}-{env['date'][:19].replace(':', '').replace('-', '')}.json"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    import tempfile

    from imagic_lite.bench import environment
    from imagic_lite.config import load_preset
    from imagic_lite.files import write_text_atomic
    from imagic_lite.models import pick_device

    for name in args.presets:
        load_preset(name)  # an unknown name fails now, not after an hour of the others
    device = pick_device(args.device)
    env = environment(device, " ".join(["python", "benchmarks/gpu_e2e.py", *(sys.argv[1:] if argv is None else argv)]))
    entries: list[dict[str, Any]] = []
    result = {"schema": "imagic-lite.e2e/1", "model": args.model, "weights": args.weights, "steps": args.steps,
              "sample_steps": args.sample_steps, "env": env, "presets": entries}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / results_name(args.model, env, args.weights)
    restore = cache_random_builds()
    try:
        with tempfile.TemporaryDirectory(prefix="imagic-e2e-") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            photo = _photo(work)
            for name in args.presets:
                print(f"+ {args.model} preset {name} ...", flush=True)
                entry = run_preset(args, name, photo, work, device)
                entries.append(entry)
                write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")  # a timeout keeps these
                if entry["ok"]:
                    print(f"  ok   {args.model} preset {name}: {entry['seconds']:.1f} s", flush=True)
                else:
                    print(_failure(args.model, entry), entry["traceback"], sep="\n", flush=True)
    finally:
        restore()
    failed = [e for e in entries if not e["ok"]]
    print(f"results: {path}")
    for e in failed:
        print(_failure(args.model, e), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
