"""Simulated GPU memory of `--auto-eta`'s search (eta 0's render and the judge) beside stage C's, on full-size
architectures with fake tensors (imagic_lite.simulate, SimSettings(auto_eta=True)): does the search need more
memory than the sampling it follows?
Usage: python benchmarks/sim_auto_eta.py arch:sd15 512 4gb,8gb [OUT.json]
"""
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's imagic_lite
from imagic_lite.config import load_preset  # noqa: E402
from imagic_lite.files import write_text_atomic  # noqa: E402
from imagic_lite.simulate import SimSettings, simulate_preset  # noqa: E402


def main(model: str, resolution: int, presets: list[str], out: str | None) -> None:
    stamp = datetime.now(timezone.utc)
    result = {"date": stamp.isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
              "kind": "simulated (fake tensors; not a GPU measurement)", "model": model, "resolution": resolution,
              "machine": platform.machine(), "torch": torch.__version__, "presets": {}}
    for name in presets:
        started = time.perf_counter()
        entry = simulate_preset(model, load_preset(name), resolution, SimSettings(auto_eta=True))
        stages = entry["stages"]
        result["presets"][name] = {
            stage: {"peak_GiB": round(stages[stage]["peak_allocated_bytes"] / 2**30, 3),
                    "where_at_peak": stages[stage]["where_at_peak"],
                    "largest_transient": stages[stage]["largest_transient"]} for stage in ("C", "eta")}
        result["presets"][name]["whole_run_without_eta_GiB"] = round(
            max(stages[s]["peak_allocated_bytes"] for s in ("encode", "A", "B", "C")) / 2**30, 3)
        result["presets"][name]["seconds_to_simulate"] = round(time.perf_counter() - started, 1)
        print(name, {k: v["peak_GiB"] for k, v in result["presets"][name].items() if isinstance(v, dict)},
              flush=True)
    path = Path(out or Path(__file__).resolve().parent / "results" /
                f"sim-auto-eta-{model.split(':')[-1]}-{resolution}px-{stamp:%Y%m%dT%H%M%S}.json")
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4] if len(sys.argv) > 4 else None)
