"""Batch runs of the imagic-lite bench (the engine is `imagic_lite.bench`, shared with `imagic-lite bench`).

Writes benchmarks/results/bench-<device>-<arch>[-capNgb]-<date>.json and a markdown table beside it, one pair per
cap. Example: python benchmarks/run_bench.py --model arch:sd15 --presets paper,cpu,8gb,4gb --resolution 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from imagic_lite.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="arch:sd15", help="arch:sd15|arch:sd21|arch:sdxl, a folder, or a hub id")
    ap.add_argument("--presets", default="paper,cpu,24gb,12gb,8gb,6gb,4gb", help="comma-separated preset names")
    ap.add_argument("--resolution", type=int, default=None, help="square side in px (default: the model's native)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per stage")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--cap-gb", default="", help="comma-separated GiB caps, one run each (CUDA only); '' = none")
    ap.add_argument("--no-paper", action="store_true", help="do not add the paper preset (no ratios then)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--also-out", type=Path, default=None, help="a second folder to copy results into (e.g. $OUT)")
    ap.add_argument("--isolate", action="store_true",
                    help="one process per preset, merged: a preset killed for host RAM only loses its own row")
    ap.add_argument("--fit-matrix", action="store_true",
                    help="with --cap-gb: one uncapped run, then capped runs only where it cannot settle the fit")
    ap.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def show(event: dict) -> None:
    peak = event["peak_bytes"] / 2**30
    speed = f"{event['s_per_step']:.3f} s/step" if event.get("s_per_step") else f"{event['wall_s']:.1f} s"
    fit = "" if event["fit"] else f"  OOM: {event['error']}"
    print(f"  {event['preset']:>6} {event['stage']:>6}  {event['label']} {peak:6.2f} GiB  {speed}{fit}", flush=True)


def run_isolated(args: argparse.Namespace, argv: list[str], cap: float | None, command: str) -> dict:
    """Each preset in its own process; the parent merges them and adds ratios and simulated peaks, as run_bench
    does."""
    from imagic_lite.bench import PAPER, add_ratios, add_simulated, preset_of, projected_seconds
    from imagic_lite.config import load_preset

    names = ([PAPER] if not args.no_paper and PAPER not in args.presets.split(",") else []) + args.presets.split(",")
    merged: dict | None = None
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            child = [sys.executable, __file__, *argv, "--presets", name, "--no-paper", "--child-json", str(out),
                     "--cap-gb", "" if cap is None else str(cap)]
            code = subprocess.call([a for a in child if a not in ("--isolate", "--fit-matrix")])
            part = json.loads(out.read_text()) if out.is_file() else None
        if part is None:  # killed (host out of memory, most likely): record it as not fitting
            print(f"  {name}: the process ended with code {code} and no result", flush=True)
            error = {"fit": False, "error": f"process ended with exit code {code} (host RAM?)", "peak_bytes": None}
            part = {"presets": {name: {"settings": load_preset(name).to_dict(), "stages": {"A": error}}}}
        if merged is None and "env" in part:
            merged = part
        elif merged is not None:
            merged["presets"].update(part["presets"])
    if merged is None:
        raise SystemExit("no preset produced a result")
    merged["env"]["command"] = command
    for entry in merged["presets"].values():
        if "settings" in entry and entry.get("stages"):
            entry["projected_s"] = projected_seconds(preset_of(entry), entry)
    add_ratios(merged)
    add_simulated(merged)
    return merged


def run_once(args: argparse.Namespace, argv: list[str], cap: float | None, presets: str, paper: bool) -> dict:
    from imagic_lite.bench import run_bench

    command = "python benchmarks/run_bench.py " + " ".join(argv)
    print(f"{args.model} cap={cap} presets={presets}", flush=True)
    if args.isolate:
        args = argparse.Namespace(**{**vars(args), "presets": presets, "no_paper": not paper})
        return run_isolated(args, argv, cap, command)
    return run_bench(args.model, presets.split(","), args.resolution, args.steps, args.warmup, cap, args.device,
                     include_paper=paper, command=command, on_event=show)


def save(result: dict, args: argparse.Namespace) -> str:
    from render import chart

    from imagic_lite.bench import render_table, write_results

    path = None
    for folder in filter(None, (args.out, args.also_out)):
        path = write_results(result, folder)
        write_text_atomic(path.with_suffix(".md"), render_table(result))
        chart(result, path.with_suffix(".png"))
        print(f"wrote {path} (+ .md, .png)", flush=True)
    return path.name if path else ""


def settled_by_uncapped(entry: dict, limit: int) -> dict | None:
    """A cap's verdict that needs no capped run: below the limit the allocator never notices the cap (the run would
    be the same), and live tensors above it cannot fit whatever the allocator does. None: measure it."""
    records = [("load", entry.get("load", {})), *entry.get("stages", {}).items()]
    if any(not rec.get("fit", True) for _, rec in records):
        failed = next(name for name, rec in records if not rec.get("fit", True))
        return {"fit": False, "source": "inferred", "stage": failed}
    over = [name for name, rec in records if (rec.get("peak_bytes") or 0) > limit]
    if over:
        return {"fit": False, "source": "inferred", "stage": over[0]}
    if all((rec.get("reserved_bytes") or 0) <= limit for _, rec in records):
        return {"fit": True, "source": "inferred", "stage": None}
    return None


def fit_matrix(args: argparse.Namespace, argv: list[str], caps: list[float]) -> None:
    """The uncapped run, then per cap only the presets it cannot settle, run under the cap; writes fit-*.json."""
    import torch

    if not torch.cuda.is_available() or (args.device or "cuda").startswith("cpu"):
        raise SystemExit("--fit-matrix needs CUDA: a cap limits the CUDA allocator (CPU peak RSS is not VRAM)")
    uncapped = run_once(args, argv, None, args.presets, not args.no_paper)
    files = [save(uncapped, args)]
    env = uncapped["env"]
    context = env.get("context_bytes", 0)
    fit = {"model": uncapped["model"], "device_name": env.get("device_name"), "date": env["date"],
           "side": next((e["side"] for e in uncapped["presets"].values() if "side" in e), args.resolution),
           "context_bytes": context, "presets": list(uncapped["presets"]), "caps": {}, "files": files}
    for cap in caps:
        limit = int(cap * 2**30) - context
        verdicts = {name: settled_by_uncapped(entry, limit) for name, entry in uncapped["presets"].items()}
        todo = [name for name, verdict in verdicts.items() if verdict is None]
        if todo:
            capped = run_once(args, argv, cap, ",".join(todo), False)
            files.append(save(capped, args))
            for name in todo:
                records = [("load", capped["presets"][name].get("load", {})),
                           *capped["presets"][name].get("stages", {}).items()]
                failed = next((s for s, rec in records if not rec.get("fit", True)), None)
                verdicts[name] = {"fit": failed is None, "source": "measured", "stage": failed}
        fit["caps"][f"{cap:g}"] = verdicts
    from imagic_lite.bench import results_name

    for folder in filter(None, (args.out, args.also_out)):
        path = folder / results_name(uncapped).replace("bench-", "fit-", 1)
        write_text_atomic(path, json.dumps(fit, indent=1) + "\n")
        print(f"wrote {path}", flush=True)


def main(argv: list[str]) -> int:
    args = parse(argv)
    import gc

    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    gc.freeze()  # the libraries' objects live for the whole run: keep the per-stage gc.collect() fast
    caps = [float(c) for c in args.cap_gb.split(",") if c.strip()]
    if args.fit_matrix:
        fit_matrix(args, argv, caps)
        return 0
    for cap in caps or [None]:
        result = run_once(args, argv, cap, args.presets, not args.no_paper)
        if args.child_json:
            write_text_atomic(args.child_json, json.dumps(result))
            continue
        save(result, args)
    return 0


if __name__ == "__main__":
    # Shared CPUs: spinning OpenMP workers stall each other (tiny-model steps ran 5-40x slower in an ad-hoc check
    # under load); it must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main(sys.argv[1:]))
