"""Fit the memory estimate's calibrated constants from two CPU bench runs of the same presets at two resolutions.

Activation coefficients are slopes (peak difference / latent-pixel difference), so everything that does not grow
with the image (weights, optimizer state, the process itself) cancels; the CPU overhead is the median intercept.
Usage: python benchmarks/calibrate.py SMALL.json LARGE.json [--out benchmarks/results/calibration-cpu-sd15.json]
       python benchmarks/calibrate.py SDXL_SMALL.json SDXL_LARGE.json --reference SD15_SMALL.json SD15_LARGE.json
       python benchmarks/calibrate.py --single bench-cuda-...-sd15-512px-....json   (half/checkpointing factors)
Presets used: paper (fp32, full), cpu (fp32, LoRA), 8gb (checkpointing), 12gb (half, where the CPU runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from imagic_lite.files import write_text_atomic


def latent_px(result: dict) -> int:
    side = next(e["side"] for e in result["presets"].values() if "side" in e)
    return (side // 8) ** 2


def slope(small: dict, large: dict, preset: str, stage: str) -> float:
    a = small["presets"][preset]["stages"][stage]["peak_bytes"]
    b = large["presets"][preset]["stages"][stage]["peak_bytes"]
    return (b - a) / (latent_px(large) - latent_px(small))


def fit(small: dict, large: dict) -> dict:
    """fp32 coefficients from paper (full) and cpu (LoRA); checkpointing from 8gb against cpu when both ran in the
    same dtype (on a CPU without bf16 the bench runs 8gb in fp32); the half factor only from a half-precision 12gb."""
    names = [n for n in ("paper", "cpu", "12gb", "8gb") if n in small["presets"] and n in large["presets"]]
    s = {(p, st): slope(small, large, p, st) for p in names for st in ("A", "B", "C")}
    out: dict = {"slopes_bytes_per_latent_px": {f"{p}/{st}": round(v) for (p, st), v in s.items()}}
    mean = statistics.mean
    out["ACT_FP32"] = {"A": mean([s["cpu", "A"], s["paper", "A"]]), "B-lora": s["cpu", "B"],
                       "B-full": s["paper", "B"], "C": mean([s["cpu", "C"], s["paper", "C"]])}
    out["ACT_FP32"] = {k: round(v, -3) for k, v in out["ACT_FP32"].items()}
    dtype = {n: large["presets"][n].get("compute_dtype") for n in names}
    if "8gb" in names and dtype["8gb"] == dtype["cpu"]:
        out["CKPT_FACTOR"] = round(mean([s["8gb", st] / s["cpu", st] for st in ("A", "B")]), 3)
    if "12gb" in names and dtype["12gb"] != "float32":
        out["HALF_FACTOR"] = round(mean([s["12gb", st] / s["cpu", st] for st in ("A", "B")]), 2)
        if "8gb" in names and dtype["8gb"] == dtype["12gb"]:
            out["CKPT_FACTOR"] = round(mean([s["8gb", st] / s["12gb", st] for st in ("A", "B")]), 3)
    out["not_measured"] = [k for k in ("CKPT_FACTOR", "HALF_FACTOR") if k not in out]
    return out


def family_scale(small: dict, large: dict, ref_small: dict, ref_large: dict) -> dict:
    """Activation growth per latent pixel of another architecture relative to the reference (cpu preset, fp32)."""
    ratios = {st: slope(small, large, "cpu", st) / slope(ref_small, ref_large, "cpu", st) for st in ("A", "B", "C")}
    return {"model": small["model"], "reference": ref_small["model"], "per_stage": {k: round(v, 3) for k, v in
            ratios.items()}, "FAMILY_ACT_SCALE": round(statistics.mean(ratios.values()), 2)}


def residual_factors(result: dict) -> dict:
    """From one run (a GPU run at 512 px, say): each preset's measured activation bytes = peak - the estimate's
    non-activation parts; then half/fp32 (12gb vs cpu) and checkpointing (8gb vs 12gb) factors, and the estimate's
    activation coefficients scaled to this device (measured / estimated activations of the cpu preset)."""
    from imagic_lite import memory
    from imagic_lite.bench import preset_of

    facts, device = memory.arch_facts(result["model"]), result["env"]["device"]
    act = {}
    for name, entry in result["presets"].items():
        est = memory.estimate(preset_of(entry), facts, entry["side"], entry["side"], device=device)
        for st in ("A", "B"):
            rec = entry["stages"].get(st, {})
            if rec.get("fit"):
                fixed = est[st]["total"] - est[st]["activations"] - (est[st]["overhead"] if device == "cuda" else 0)
                act[name, st] = (rec["peak_bytes"] - fixed, est[st]["activations"])
    out: dict = {"activation_bytes": {f"{n}/{st}": v[0] for (n, st), v in act.items()}}
    pairs = {"HALF_FACTOR": ("12gb", "cpu"), "CKPT_FACTOR": ("8gb", "12gb"), "ACT_SCALE_vs_estimate": ("cpu", None)}
    for key, (a, b) in pairs.items():
        if all((n, st) in act for n in filter(None, (a, b)) for st in ("A", "B")):
            ratios = [act[a, st][0] / (act[b, st][0] if b else act[a, st][1]) for st in ("A", "B")]
            out[key] = round(statistics.mean(ratios), 3)
    return out


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
    ap.add_argument("large", type=Path, nargs="?")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--single", action="store_true",
                    help="one run (SMALL only, LARGE ignored): residual half/checkpointing factors, e.g. on CUDA")
    ap.add_argument("--reference", type=Path, nargs=2, default=None,
                    help="two runs of the reference model: then fit only the activation scale relative to it")
    args = ap.parse_args(argv)
    if args.single:
        print(json.dumps(residual_factors(json.loads(args.small.read_text())), indent=1))
        return 0
    small, large = (json.loads(p.read_text()) for p in (args.small, args.large))
    if args.reference:
        ref = [json.loads(p.read_text()) for p in args.reference]
        out = {**family_scale(small, large, *ref), "sources": [p.name for p in (args.small, args.large,
                                                                                 *args.reference)]}
        text = json.dumps(out, indent=1)
        print(text)
        if args.out:
            write_text_atomic(args.out, text + "\n")
        return 0
    out = {"model": small["model"], "device": small["env"]["device"], "sources": [args.small.name, args.large.name],
           "sides": [next(e["side"] for e in r["presets"].values() if "side" in e) for r in (small, large)],
           **fit(small, large)}
    from imagic_lite.memory import estimate_constants

    out["CPU_OVERHEAD_BYTES"] = intercept([small, large])
    out["intercept_computed_with"] = estimate_constants()  # the intercept depends on them: rerun after a change
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
