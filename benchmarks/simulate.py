"""From `imagic-lite bench --simulate` results to what the project ships and shows.

    imagic-lite bench --simulate --model arch:sd15 --resolution 512 --presets 4gb,6gb,8gb,12gb,24gb,paper,cpu
    (likewise arch:sd21 at 768 and arch:sdxl at 1024), then
    python benchmarks/simulate.py benchmarks/results/sim-sd15-512px-*.json ...sim-sd21-...json ...sim-sdxl-...json

writes `imagic_lite/archs/simulated.json` (the table `imagic-lite presets` and `--vram` read, keyed by architecture,
side and settings; entries without their FLOP details to stay small) and `benchmarks/results/sim-memory.png` (stacked
bars per stage and preset, parts of the peak, with the largest allocator peak each card size allows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imagic_lite.bench import preset_of
from imagic_lite.files import write_text_atomic
from imagic_lite.vram import (
    CARD_GIB,
    CONTEXT_BYTES,
    FRAGMENTATION,
    PARTS,
    STAGES,
    GiB,
    config_fingerprint,
    model_path,
    preset_key,
)

TABLE = Path(__file__).resolve().parent.parent / "imagic_lite" / "archs" / "simulated.json"
CHART = Path(__file__).resolve().parent / "results" / "sim-memory.png"
COLOURS = {"weights": "#4c72b0", "trainable": "#55a868", "grads": "#c44e52", "optimizer": "#8172b2",
           "activations": "#ccb974"}


def table_entries(result: dict) -> dict[str, dict]:
    path = model_path(result["model"])
    fingerprint = config_fingerprint(path)
    out = {}
    for entry in result["presets"].values():
        key = preset_key(fingerprint, entry["side"], preset_of(entry))
        slim = {k: v for k, v in entry.items() if k not in ("verdict",)}
        out[key] = {**slim, "model": result["model"], "date": result["env"]["date"]}
    return out


def chart(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5.2), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        names = list(result["presets"])
        width = 0.8 / len(STAGES)
        for i, name in enumerate(names):
            stages = result["presets"][name]["stages"]
            for j, stage in enumerate(STAGES):
                x = i + (j - (len(STAGES) - 1) / 2) * width
                bottom = 0.0
                for part in PARTS:
                    h = stages[stage]["parts_at_peak"][part] / GiB
                    ax.bar(x, h, width * 0.92, bottom=bottom, color=COLOURS[part],
                           label=part if (i, j) == (0, 0) else None)
                    bottom += h
                ax.text(x, bottom, stage, ha="center", va="bottom", fontsize=6)
        top = max(r["stages"][s]["peak_allocated_bytes"] for r in result["presets"].values() for s in STAGES) / GiB
        for gb in CARD_GIB:
            usable = (gb * GiB - CONTEXT_BYTES) / (1 + FRAGMENTATION) / GiB
            ax.axhline(usable, color="grey", lw=0.8, ls="--")
            ax.text(len(names) - 0.45, usable, f"{gb} GB card", fontsize=7, va="bottom", ha="right", color="grey")
            if usable > top:
                break  # the first card above the tallest bar is the last line worth drawing
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("simulated peak allocated, GiB")
        ax.set_title(f"{result['model']} at {result['resolution']} px (encode, A, B, C)", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("GPU memory per stage and preset, simulated on fake tensors (imagic-lite bench --simulate)\n"
                 f"dashed: the largest peak an N GB card allows after {CONTEXT_BYTES / GiB:.1f} GiB context and a "
                 f"{FRAGMENTATION:.0%} allocator allowance (both assumed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def readme_table(results: list[dict], names: list[str]) -> str:
    """The README's table: whole-run simulated peak per preset and model (stage in brackets), the smallest card."""
    head = "| preset | " + " | ".join(f"{r['model'].removeprefix('arch:')} {r['resolution']} px" for r in results)
    lines = [head + " |", "|---|" + "---|" * len(results)]
    for name in names:
        cells = []
        for r in results:
            entry = r["presets"].get(name)
            if entry is None:
                cells.append("-")
                continue
            v = entry["verdict"]
            card = f"{v['smallest_card_gib']} GB" if v["smallest_card_gib"] else "> 24 GB"
            cells.append(f"{v['peak_allocated_bytes'] / GiB:.2f} GiB ({v['peak_stage']}) → {card}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    results = [json.loads(Path(a).read_text()) for a in argv]
    merged: dict[tuple, dict] = {}  # one model and side may come from several runs (a preset rerun after a change)
    for r in results:
        key = (r["model"], r["resolution"])
        if key in merged:
            merged[key]["presets"].update(r["presets"])
        else:
            merged[key] = json.loads(json.dumps(r))
    names = list(dict.fromkeys(n for r in merged.values() for n in r["presets"]))
    print(readme_table(list(merged.values()), names))
    table: dict[str, dict] = {}
    for result in results:
        table.update(table_entries(result))
    write_text_atomic(TABLE, json.dumps(table, sort_keys=True) + "\n")
    print(f"wrote {TABLE} ({len(table)} entries)")
    chart(list(merged.values()), CHART)
    print(f"wrote {CHART}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
