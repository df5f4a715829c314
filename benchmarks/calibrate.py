"""Fit the memory estimate's calibrated constants from two CPU bench runs of the same presets at two resolutions.

Activation coefficients are slopes (peak difference / latent-pixel difference), so everything that does not grow
with the image (weights, optimizer state, the process itself) cancels; the CPU overhead is the median intercept.
Usage: python benchmarks/calibrate.py SMALL.json LARGE.json [--out benchmarks/results/calibration-cpu-sd15.json]
Presets needed: paper (fp32, full), cpu (fp32, LoRA), 12gb (half), 8gb (half + checkpointing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def latent_px(result: dict) -> int:
    side = next(e["side"] for e in result["presets"].values() if "side" in e)
    return (side // 8) ** 2


def slope(small: dict, large: dict, preset: str, stage: str) -> float:
    a = small["presets"][preset]["stages"][stage]["peak_bytes"]
    b = large["presets"][preset]["stages"][stage]["peak_bytes"]
    return (b - a) / (latent_px(large) - latent_px(small))


def fit(small: dict, large: dict) -> dict:
    s = {(p, st): slope(small, large, p, st) for p in ("paper", "cpu", "12gb", "8gb") for st in ("A", "B", "C")}
    act = {"A": statistics.mean([s["cpu", "A"], s["paper", "A"]]), "B-lora": s["cpu", "B"],
           "B-full": s["paper", "B"], "C": statistics.mean([s["cpu", "C"], s["paper", "C"]])}
    half = statistics.mean([s["12gb", "A"] / s["cpu", "A"], s["12gb", "B"] / s["cpu", "B"]])
    ckpt = statistics.mean([s["8gb", "A"] / s["12gb", "A"], s["8gb", "B"] / s["12gb", "B"]])
    return {"slopes_bytes_per_latent_px": {f"{p}/{st}": round(v) for (p, st), v in s.items()},
            "ACT_FP32": {k: round(v, -3) for k, v in act.items()}, "HALF_FACTOR": round(half, 2),
            "HALF_FACTOR_C": round(s["12gb", "C"] / s["cpu", "C"], 2), "CKPT_FACTOR": round(ckpt, 3)}


def intercept(results: list[dict]) -> int:
    """Median of (measured peak - estimate without overhead) over every preset and stage: the process overhead."""
    from imagic_lite import memory
    from imagic_lite.config import load_preset

    facts = memory.arch_facts(results[0]["model"])
    gaps = []
    for result in results:
        for name, entry in result["presets"].items():
            est = memory.estimate(load_preset(name), facts, entry["side"], entry["side"], device="cpu")
            gaps += [entry["stages"][st]["peak_bytes"] - (est[st]["total"] - est[st]["overhead"]) for st in est]
    return int(statistics.median(gaps))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("small", type=Path)
    ap.add_argument("large", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    small, large = (json.loads(p.read_text()) for p in (args.small, args.large))
    out = {"model": small["model"], "device": small["env"]["device"], "sources": [args.small.name, args.large.name],
           "sides": [next(e["side"] for e in r["presets"].values() if "side" in e) for r in (small, large)],
           **fit(small, large)}
    out["CPU_OVERHEAD_BYTES"] = intercept([small, large])
    out["note"] = ("CPU_OVERHEAD_BYTES is measured with the ACT_FP32/HALF/CKPT constants in memory.py at the time "
                   "of this run: rerun after updating them.")
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
