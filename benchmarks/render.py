"""Render bench results: each JSON becomes a markdown table (.md) and a PNG chart of peak memory per stage and preset
with 4/6/8/12 GB card lines; fit-*.json files (caps) become a preset x cap table.

Usage: python benchmarks/render.py [--re-simulated] benchmarks/results/bench-*.json [benchmarks/results/fit-*.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

from imagic_lite.files import write_text_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GiB = 2**30
CARDS = (4, 6, 8, 12)
STAGES = ("A", "B", "C")
COLORS = {"A": "#4c72b0", "B": "#dd8452", "C": "#55a868"}


def chart(result: dict, path: Path) -> None:
    """Grouped bars: one group per preset, one bar per stage; a stage that ran out of memory is an OOM mark."""
    env = result["env"]
    cpu = env["device"] == "cpu"
    names = list(result["presets"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 4.6))
    width = 0.8 / len(STAGES)
    for i, stage in enumerate(STAGES):
        for j, name in enumerate(names):
            rec = result["presets"][name].get("stages", {}).get(stage)
            x = j + (i - 1) * width
            if rec and rec.get("fit") and rec.get("peak_bytes"):
                ax.bar(x, rec["peak_bytes"] / GiB, width, color=COLORS[stage], label=stage if j == 0 else None)
            else:
                ax.text(x, 0.2, "OOM" if rec else "-", ha="center", va="bottom", rotation=90, fontsize=7)
    for gb in CARDS:
        ax.axhline(gb, color="grey", lw=0.8, ls="--")
        ax.text(-0.5, gb, f" {gb} GB", va="bottom", ha="left", fontsize=7, color="grey")
    ax.set_xticks(range(len(names)), names)
    what = "peak RSS, GiB (CPU process; not VRAM)" if cpu else "max_memory_allocated, GiB"
    ax.set_ylabel(what)
    side = next((e["side"] for e in result["presets"].values() if "side" in e), result.get("resolution"))
    cap = f", cap {result['cap_gb']:g} GiB" if result.get("cap_applied") else ""
    ax.set_title(f"{result['model']} at {side} px on {env.get('device_name', env['device'])}{cap}\n"
                 "peak memory per stage (A embed, B tune, C sample)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fit_table(fit: dict) -> str:
    """Preset x cap: 'yes'/'no (stage)', and whether a capped run measured it or the uncapped run settles it."""
    caps = sorted({float(c) for c in fit["caps"]})
    lines = [f"### Fits under a memory cap: {fit['model']} at {fit['side']} px on {fit['device_name']}", "",
             "measured: a run under `set_per_process_memory_fraction` did not OOM; inferred: the uncapped run's "
             "max_memory_reserved was below the cap's allocator limit (fits) or its max_memory_allocated above it "
             "(cannot fit).", "",
             "| preset | " + " | ".join(f"{c:g} GB" for c in caps) + " |",
             "|---|" + "---|" * len(caps)]
    for name in fit["presets"]:
        cells = []
        for cap in caps:
            cell = fit["caps"][f"{cap:g}"].get(name)
            if cell is None:
                cells.append("-")
            else:
                verdict = "yes" if cell["fit"] else f"no ({cell.get('stage') or '?'})"
                cells.append(f"{verdict}, {cell['source']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    again = "--re-simulated" in argv  # refresh the simulated columns (CUDA results) from the shipped/cached ones
    from imagic_lite.bench import add_simulated, render_table

    for name in (a for a in argv if a != "--re-simulated"):
        path = Path(name)
        data = json.loads(path.read_text())
        if "caps" in data:
            write_text_atomic(path.with_suffix(".md"), fit_table(data))
            continue
        if again:
            add_simulated(data)
            write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        write_text_atomic(path.with_suffix(".md"), render_table(data))
        chart(data, path.with_suffix(".png"))
        print(f"rendered {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
