"""Jobs per hour of `imagic-lite batch` with 1 and with N processes, in one run (ratio included), and what the
UNet reset between jobs costs; writes benchmarks/results/batch-<device>-<date>.json.

Here (CPU): `python benchmarks/batch_bench.py` (1 process with all cores' threads, then 2 torchrun gloo processes
with one thread each). On a machine with N GPUs: `python benchmarks/batch_bench.py --processes 1,N --launcher
accelerate --jobs 4N`. The machine's load average is recorded before and after: on a shared machine the ratio is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["a blue circle", "a green circle", "a red square", "a yellow circle", "a blue square", "a green square",
           "a red triangle", "a yellow square"]


def jobs_file(folder: Path, count: int) -> Path:
    """`count` jobs on the README's example photo, each toward another shape or colour."""
    image = ROOT / "examples" / "red-circle.png"
    lines = ["image,prompt,name"] + [f"{image},{PROMPTS[i % len(PROMPTS)]},job{i}" for i in range(count)]
    path = folder / "jobs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch(processes: int, launcher: str, args: list[str], omp: str | None) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)} | ({"OMP_NUM_THREADS": omp} if omp else {})
    if processes == 1:
        return [sys.executable, "-m", "imagic_lite", *args], env
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")  # what torchrun sets: one thread per process
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", str(processes), "-m", "imagic_lite", *args], env
    return [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "-m",
            "imagic_lite", *args], env


def timed_batch(processes: int, launcher: str, jobs: Path, out: Path, model: str, extra: list[str],
                omp: str | None) -> dict:
    command, env = launch(processes, launcher, ["batch", str(jobs), "--out", str(out), "--model", model, "--quiet",
                                                *extra], omp)
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()] if \
        (out / "summary.jsonl").is_file() else []
    finished = sum(line["status"] == "done" for line in lines)
    return {
        "processes": processes, "command": " ".join(command[command.index("imagic_lite") - 1:]) if processes == 1
        else " ".join([Path(command[0]).name, *command[1:]]), "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "exit_code": done.returncode, "stderr_tail": done.stderr[-500:], "wall_seconds": round(wall, 2),
        "jobs_done": finished, "jobs_per_hour": round(finished / wall * 3600, 1) if finished else 0.0,
        "stage_seconds_per_job": [line["seconds"] for line in lines],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


def reset_cost(model: str) -> dict:
    """What pristine.py costs on this model: the full-mode CPU copy (bytes, seconds to take) and the restore."""
    import torch

    from imagic_lite.api import resolve_settings
    from imagic_lite.config import load_preset
    from imagic_lite.lora import add_lora, lora_config
    from imagic_lite.models import load_components, resolve_model
    from imagic_lite.pristine import before_base_change, pristine_bytes, reset_unet

    settings = resolve_settings(resolve_model(model), load_preset("cpu"), None, {})
    c = load_components(model, settings.memory, torch.device("cpu"))
    start = time.perf_counter()
    before_base_change(c)
    snapshot = time.perf_counter() - start
    c.unet.float()
    start = time.perf_counter()
    reset_unet(c)
    restore = time.perf_counter() - start
    add_lora(c.unet, lora_config(settings.tune))
    start = time.perf_counter()
    reset_unet(c)
    unload = time.perf_counter() - start
    return {"model": model, "unet_parameters": sum(p.numel() for p in c.unet.parameters()),
            "full_mode_copy_bytes": pristine_bytes(c), "full_mode_copy_seconds": round(snapshot, 4),
            "full_mode_restore_seconds": round(restore, 4), "lora_unload_seconds": round(unload, 4),
            "note": "the copy is taken once per process, only when a job fine-tunes fully or applies a full bundle"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="Comma-separated process counts to compare.")
    parser.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun",
                        help="How to start more than one process (accelerate: --multi_gpu, for GPUs).")
    parser.add_argument("--jobs", type=int, default=4, help="Jobs per batch (a multiple of every process count).")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--omp-threads", help="OMP_NUM_THREADS for every run (default: torch's own for 1 process, "
                        "1 per process for more, as torchrun sets); 1 separates parallelism from thread contention.")
    parser.add_argument("--extra", default="", help="More batch flags, e.g. '--tune-steps 50'.")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.processes.split(",")]
    extra = args.extra.split()
    runs = []
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        jobs = jobs_file(Path(tmp), args.jobs)
        for n in counts:
            runs.append(timed_batch(n, args.launcher, jobs, Path(tmp) / f"out-{n}", args.model, extra,
                                    args.omp_threads))
    import torch

    from imagic_lite.api import versions
    from imagic_lite.files import write_text_atomic

    base = runs[0]["jobs_per_hour"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "script": "benchmarks/batch_bench.py",
        "argv": sys.argv[1:] if argv is None else argv, "model": args.model, "jobs": args.jobs,
        "settings": "the model's recommended settings (imagic-lite.toml) over the cpu/auto preset" +
                    (f", plus {args.extra}" if extra else ""),
        "runs": runs, "ratios_to_first": {str(r["processes"]): round(r["jobs_per_hour"] / base, 3) if base else None
                                          for r in runs},
        "reset": reset_cost(args.model),
        "device": {"cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count(), "cpu_count": os.cpu_count(),
                   "processor": platform.processor() or platform.machine()},
        "versions": versions() | {"python": platform.python_version()},
        "caveat": "the machine may be shared: compare load_average_before/after; the ratio is noisy",
    }
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / f"batch-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(json.dumps({"results": str(path), "ratios": result["ratios_to_first"],
                      "jobs_per_hour": [r["jobs_per_hour"] for r in runs]}))
    return result


if __name__ == "__main__":
    main()
