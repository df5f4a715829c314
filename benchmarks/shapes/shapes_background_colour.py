"""Colour on non-gray backgrounds: samples the same small shapes on gray, black and white backgrounds for one or more
shapes pipelines and guidance scales, and reads each sample's colour back with the checker.

Why: the 100-sample evaluation misses colour almost only on black and white backgrounds (orange drawn yellow, purple
drawn blue). This shows per model and guidance scale where that starts, so a training change can be judged on it.
Writes benchmarks/results/shapes-background-colour-<name>.json.

    python benchmarks/shapes/shapes_background_colour.py MODEL [MODEL ...] --name NAME [--guidance 1,3,6]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from imagic_lite.files import write_text_atomic  # noqa: E402
from imagic_lite.shapes import world  # noqa: E402
from imagic_lite.shapes.checker import read  # noqa: E402
from imagic_lite.shapes.evaluate import load_pipeline  # noqa: E402

COLOURS = ("orange", "purple", "red", "blue")
BACKGROUNDS = ("gray", "black", "white")
SHAPES = ("circle", "square", "triangle")


def caption(colour: str, shape: str, background: str) -> str:
    scene = world.Scene(shape, colour, "small", "left", background)
    return world.full_caption(scene)


def run(model: Path, guidance: float, seeds: int) -> dict:
    pipe = load_pipeline(model)
    cells = {}
    for background in BACKGROUNDS:
        for colour in COLOURS:
            captions = [caption(colour, shape, background) for shape in SHAPES] * seeds
            images = pipe(captions, num_inference_steps=25, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(1)).images
            found = [read(image).main for image in images]
            cells[f"{colour} on {background}"] = {
                "right": sum(o is not None and o.colour == colour for o in found) / len(found),
                "read": [None if o is None else {"colour": o.colour, "rgb": list(o.rgb)} for o in found],
            }
    by_background = {b: sum(cells[f"{c} on {b}"]["right"] for c in COLOURS) / len(COLOURS) for b in BACKGROUNDS}
    return {"model": str(model), "guidance": guidance, "colour_right_by_background": by_background, "cells": cells}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--guidance", default="6", help="comma-separated guidance scales")
    parser.add_argument("--seeds", type=int, default=2, help="samples per caption")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [run(model, float(g), args.seeds) for model in args.models for g in args.guidance.split(",")]
    result = {
        "runs": runs,
        "settings": {"scheduler": "the pipeline's (DDIM)", "steps": 25, "seed": 1, "size": "small",
                     "position": "left", "shapes": SHAPES, "samples_per_caption": args.seeds},
        "note": args.note,
        "device": f"{platform.machine()} cpu, 1 thread",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/shapes/shapes_background_colour.py", *sys.argv[1:]]),
    }
    out = ROOT / "benchmarks" / "results" / f"shapes-background-colour-{args.name}.json"
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(r["model"], "guidance", r["guidance"], json.dumps(r["colour_right_by_background"]))


if __name__ == "__main__":
    main()
