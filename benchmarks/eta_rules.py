"""Compare auto-eta choice rules offline on dev-suite measurements (benchmarks/eta_dev.py output): for each rule,
the share of cases where its chosen eta edits with everything kept, beside the best eta per case and the best
single eta. Only dev suites (seeds 2, 3) may choose the rule; the benchmark suites grade it afterwards.
Usage: python benchmarks/eta_rules.py DEV.json [DEV.json ...] [--grid 0.6,0.8,1.0,1.2,1.4,1.6] [--out OUT.json]
"""
import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's imagic_lite
from imagic_lite.files import write_text_atomic  # noqa: E402

PRODUCTION_TS = (350, 550, 750)


STATS = {  # name: (timesteps, conds compared: err[second] - err[first]); cond 0 e_tgt, 1 e_opt, 2 uncond
    "prod": (PRODUCTION_TS, (0, 1)),
    "ts5": ((150, 350, 550, 750, 950), (0, 1)),
    "ts-low": ((150, 250, 350), (0, 1)),
    "ts-high": ((650, 750, 850), (0, 1)),
    "all": (tuple(range(50, 1000, 100)), (0, 1)),
    "uncond": (PRODUCTION_TS, (0, 2)),
    "uncond-ts5": ((150, 350, 550, 750, 950), (0, 2)),
    "uncond-all": (tuple(range(50, 1000, 100)), (0, 2)),
    "uncond-low": ((150, 250, 350), (0, 2)),
    "uncond-high": ((650, 750, 850), (0, 2)),
    "opt-uncond": (PRODUCTION_TS, (1, 2)),  # how well e_opt explains the image (fidelity in the model's terms)
}


def load(paths: list[str], grid: tuple[float, ...]) -> list[dict]:
    """Cases with, per grid eta (eta 0 first): alignment statistics (STATS; "prod" is what imagic_lite.eta computes),
    squared distances between images (input first) and the checker's verdict."""
    cases = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        etas, ts, k = data["etas"], data["timesteps"], data["noises"]
        for row in data["rows"]:
            err = np.array(row["err_base"])  # images, conds, (timestep, noise) pairs
            index = {e: 1 + etas.index(e) for e in (0.0, *grid)}  # image index (input is 0)
            aligns = {}
            for name, (steps, (first, second)) in STATS.items():
                cols = [ts.index(t) * k + j for t in steps for j in range(k)]
                aligns[name] = {e: float((err[i, second, cols] - err[i, first, cols]).mean())
                                for e, i in index.items()}
                diffs = {e: err[i, second, cols] - err[i, first, cols] for e, i in index.items()}
                aligns[name + " z"] = {e: float(d.mean() / (d.std(ddof=1) / np.sqrt(len(d)) + 1e-12))
                                       for e, d in diffs.items()}
            verdict = {e: (row["scores"][i - 1]["success"], row["scores"][i - 1]["preserved"])
                       for e, i in index.items()}
            cases.append({"id": f"{data['suite_seed']}-{row['case']}", "kind": row["kind"], "grid": grid,
                          "aligns": aligns, "align": aligns["prod"], "lat": np.array(row["lat_d2"]),
                          "pix": np.array(row["pix_d2"]), "index": index, "verdict": verdict})
    return cases


def both(case: dict, eta: float) -> bool:
    success, preserved = case["verdict"][eta]
    return success and preserved


# --- rules: case -> chosen eta (production-available quantities only: alignment, images) ---

def knee(case: dict, fraction: float, stat: str = "prod") -> float:
    a, grid = case["aligns"][stat], case["grid"]
    best = max(a[e] for e in grid)
    if best <= a[0.0]:
        return grid[0]
    threshold = min(best, a[0.0] + fraction * (best - a[0.0]))
    return next(e for e in grid if a[e] >= threshold)


def crossing(case: dict, stat: str = "prod", fallback: float = 0.75) -> float:
    """The smallest eta whose alignment is above zero: the base model, as a classifier between the two texts Imagic
    holds, says the target text describes the image better than the embedding that reconstructs the photo. If no
    tried eta gets there, the knee at `fallback`."""
    a, grid = case["aligns"][stat], case["grid"]
    return next((e for e in grid if a[e] > 0), None) or knee(case, fallback, stat)


def step_after(case: dict, eta: float, steps: int = 1) -> float:
    grid = case["grid"]
    return grid[min(len(grid) - 1, grid.index(eta) + steps)]


def jump(case: dict) -> float:
    """The eta at the top of the largest rise in alignment between neighbouring etas (eta 0 included)."""
    seq = (0.0, *case["grid"])
    rises = [case["align"][seq[i + 1]] - case["align"][seq[i]] for i in range(len(seq) - 1)]
    return seq[1 + int(np.argmax(rises))]


def settled(case: dict, start: float, ratio: float, space: str = "lat") -> float:
    """From `start` on, the first eta whose image is closer to the next eta's image than `ratio` x its distance to
    eta 0's render (the edit has stopped changing the picture); else the last."""
    d, idx, grid = case[space], case["index"], case["grid"]
    for e in grid[grid.index(start):-1]:
        nxt = step_after(case, e)
        if d[idx[e], idx[nxt]] <= ratio * d[idx[e], idx[0.0]]:
            return e
    return grid[-1]


def penalised(case: dict, lam: float, space: str = "lat") -> float:
    """argmax alignment - lam x distance to eta 0's render (normalised by the largest such distance)."""
    d, idx, a, grid = case[space], case["index"], case["align"], case["grid"]
    far = max(d[idx[e], idx[0.0]] for e in grid) or 1.0
    gain = max(a[e] for e in grid) - a[0.0] or 1.0
    return max(grid, key=lambda e: (a[e] - a[0.0]) / gain - lam * d[idx[e], idx[0.0]] / far)


def production(case: dict) -> float:
    """imagic_lite.eta's own rule with its default settings, on the production judge's statistic."""
    from imagic_lite.eta import AutoEtaSettings, pick

    scores = {e: {"alignment": a} for e, a in case["aligns"]["prod"].items()}
    return pick(scores, AutoEtaSettings(), decides=True)[0]


def rules() -> dict[str, Callable[[dict], float]]:
    out: dict[str, Callable[[dict], float]] = {"imagic_lite.eta (defaults)": production}
    for f in (0.5, 0.6, 0.75, 0.9, 1.0):
        out[f"knee {f:g}"] = lambda c, f=f: knee(c, f)
        out[f"knee {f:g} +1"] = lambda c, f=f: step_after(c, knee(c, f))
    for stat in STATS:
        if stat != "prod":
            for f in (0.6, 0.75):
                out[f"knee {f:g} {stat}"] = lambda c, f=f, st=stat: knee(c, f, st)
                out[f"knee {f:g} {stat} +1"] = lambda c, f=f, st=stat: step_after(c, knee(c, f, st))
    for stat in STATS:
        for z in (1.0, 2.0, 3.0, 4.0):
            out[f"confident {stat} z>{z:g}"] = lambda c, st=stat, z=z: next(
                (e for e in c["grid"] if c["aligns"][st + " z"][e] > z), None) or knee(c, 0.75, st)
            out[f"confident {stat} z>{z:g} +1"] = lambda c, st=stat, z=z: step_after(c, next(
                (e for e in c["grid"] if c["aligns"][st + " z"][e] > z), None) or knee(c, 0.75, st))
        for k in (0, 1, 2):
            out[f"cross {stat} +{k}"] = lambda c, st=stat, k=k: step_after(c, crossing(c, st), k)
    for stat in STATS:
        out[f"argmax {stat}"] = lambda c, st=stat: max(c["grid"], key=lambda e: c["aligns"][st][e])
        for tol in (0.9, 0.95):
            out[f"near max {tol:g} {stat}"] = lambda c, st=stat, tol=tol: knee(c, tol, st)
    out["jump"] = jump
    out["jump +1"] = lambda c: step_after(c, jump(c))
    out["jump +2"] = lambda c: step_after(c, jump(c), 2)
    for r in (0.1, 0.2, 0.3, 0.5):
        for space in ("lat", "pix"):
            out[f"settled after jump {space} {r:g}"] = lambda c, r=r, s=space: settled(c, jump(c), r, s)
            out[f"settled after knee .75 {space} {r:g}"] = lambda c, r=r, s=space: settled(c, knee(c, .75), r, s)
    for lam in (0.1, 0.25, 0.5, 1.0):
        out[f"penalised {lam:g}"] = lambda c, lam=lam: penalised(c, lam)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dev", nargs="+")
    parser.add_argument("--grid", default="0.6,0.8,1.0,1.2,1.4,1.6")
    parser.add_argument("--out")
    args = parser.parse_args()
    grid = tuple(float(x) for x in args.grid.split(","))
    cases = load(args.dev, grid)
    n = len(cases)
    oracle = sum(any(both(c, e) for e in grid) for c in cases)
    single = {e: sum(both(c, e) for c in cases) for e in grid}
    lines = [f"{n} dev cases, grid {args.grid}: best eta per case {oracle / n:.0%}, single etas "
             + " ".join(f"{e:g}:{v / n:.0%}" for e, v in single.items())]
    table = []
    kinds = sorted({c["kind"] for c in cases})
    for name, rule in rules().items():
        picks = [rule(c) for c in cases]
        hits = [both(c, e) for c, e in zip(cases, picks, strict=True)]
        by_kind = {k: np.mean([h for c, h in zip(cases, hits, strict=True) if c["kind"] == k]) for k in kinds}
        table.append({"rule": name, "both": sum(hits) / n, "by_kind": by_kind,
                      "misses": [c["id"] for c, h in zip(cases, hits, strict=True) if not h]})
    table.sort(key=lambda r: -r["both"])
    for r in table:
        lines.append(f"{r['rule']:32s} {r['both']:.0%}  " + " ".join(f"{k[:6]}:{v:.0%}" for k, v in
                                                                     r["by_kind"].items()))
    print("\n".join(lines))
    if args.out:
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["python", *sys.argv]), "dev": args.dev, "grid": grid, "cases": n,
                  "summary": lines, "table": table}
        write_text_atomic(Path(args.out), json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
