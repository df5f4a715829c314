"""Times the README quickstart (`imagic-lite run examples/red-circle.png "a blue circle" --model shapes`) under
/usr/bin/time -v and reads every output back with the checker; writes benchmarks/results/quickstart.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from imagic_lite.files import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGE = "examples/red-circle.png"
PROMPT = "a blue circle"


def time_fields(report: str) -> dict[str, float]:
    """Wall time (s), peak RSS (MB) and CPU seconds from GNU time's -v report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", report)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    user = re.search(r"User time \(seconds\): ([\d.]+)", report)
    system = re.search(r"System time \(seconds\): ([\d.]+)", report)
    hours, minutes, seconds = (float(wall.group(1) or 0), float(wall.group(2)), float(wall.group(3)))
    return {"wall_seconds": round(hours * 3600 + minutes * 60 + seconds, 2),
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1),
            "cpu_seconds": round(float(user.group(1)) + float(system.group(1)), 2)}


def read_outputs(run_json: dict) -> list[dict]:
    """The checker's reading of each sample, and whether it is a blue circle where the red one was (big, centre)."""
    from imagic_lite.shapes.checker import read

    readings = []
    for path in run_json["outputs"]:
        match = re.search(r"_eta(-?[\d.]+)_seed(\d+)\.png$", path)
        if not match:
            continue
        reading = read(Image.open(path))
        main = reading.main
        edited = main is not None and main.colour == "blue"
        kept = (main is not None and main.shape == "circle" and main.size == "big" and main.position == "center"
                and reading.background == "gray" and len(reading.objects) == 1)
        readings.append({"eta": float(match.group(1)), "seed": int(match.group(2)), "file": Path(path).name,
                         "reading": reading.to_dict(), "colour_changed": edited, "rest_kept": kept})
    return sorted(readings, key=lambda r: (r["seed"], r["eta"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP_NUM_THREADS for the run (default: unset, as a user would run it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "quickstart.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run's output folder here")
    ap.add_argument("--model", default="shapes", help="for trying the script on another model folder")
    ap.add_argument("extra", nargs="*", help="more flags for `imagic-lite run` (after --), e.g. --embed-steps 5")
    args = ap.parse_args(argv)
    exe = shutil.which("imagic-lite") or str(Path(sys.executable).parent / "imagic-lite")
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        out_dir = args.keep or Path(tmp) / "out"
        command = [exe, "run", IMAGE, PROMPT, "--model", args.model, "--out", str(out_dir), "--overwrite", "--json",
                   *args.extra]
        timed = subprocess.run(["/usr/bin/time", "-v", *command], cwd=ROOT, env=env, capture_output=True, text=True)
        if timed.returncode != 0:
            raise SystemExit(f"the quickstart failed ({timed.returncode}):\n{timed.stderr[-3000:]}")
        run_json = json.loads((out_dir / "run.json").read_text())
        readings = read_outputs(run_json)
        grid = args.out.with_name(args.out.stem + "-grid.png")  # the picture the README shows
        grids = sorted(out_dir.glob("*_grid.png"))
        if grids:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grids[0], grid)
    import torch

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f'imagic-lite run {IMAGE} "{PROMPT}" --model {args.model}' + "".join(f" {a}" for a in args.extra),
        "measured_with": "/usr/bin/time -v " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(command)),
        "script": "python benchmarks/quickstart.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        **time_fields(timed.stderr),
        "under_two_minutes": None,
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "stages": {s["stage"]: round(s["seconds"], 2) for s in run_json["stages"]},
        "settings": run_json["preset"],
        "notes": run_json["notes"],
        "readings": readings,
        "grid": grid.name if grids else None,
        "edited_at_etas": [r["eta"] for r in readings if r["colour_changed"] and r["rest_kept"]],
        "device": run_json["device"] | {"cpu_count": os.cpu_count(), "processor": platform.processor()},
        "versions": run_json["versions"] | {"python": platform.python_version(), "torch_threads_here":
                                            torch.get_num_threads()},
    }
    result["under_two_minutes"] = result["wall_seconds"] < 120
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_seconds", "peak_rss_mb", "cpu_seconds", "stages",
                                             "edited_at_etas")}, indent=1))
    return result


if __name__ == "__main__":
    main()
