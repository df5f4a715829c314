"""The simulation's proof on a full-size model: the same counter (imagic_lite.simulate.LiveBytes) on the same stages,
once on real CPU tensors and once on fake ones, SD 1.5 at a small side (real fp32 SD 1.5 at 512 px would need more
of this shared machine's RAM and hours; the op sequence, hence what is counted, does not depend on the side).

    python benchmarks/sim_proof.py [--side 128] [--presets cpu,8gb-fp32]

`8gb-fp32` is the 8gb preset (checkpointing on) with fp32 weights: this CPU has no native bf16 (a bf16 convolution
ran ~150x slower than fp32), so real half-precision runs of the full-size UNet are out of reach here; the tiny-model
test (tests/test_simulate.py) covers bf16, fp8 and 8-bit AdamW. Writes results/sim-proof-sd15-<side>px-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import replace
from pathlib import Path

from imagic_lite.config import load_preset
from imagic_lite.files import write_text_atomic
from imagic_lite.simulate import SimSettings, measure_real, simulate_preset
from imagic_lite.vram import STAGES, environment


def preset_named(name: str):
    if name.endswith("-fp32"):
        base = load_preset(name.removesuffix("-fp32"))
        return replace(base, name=name, memory=replace(base.memory, weights="fp32"))
    return load_preset(name)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="arch:sd15")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--presets", default="cpu,8gb-fp32")
    parser.add_argument("--explain-rss", metavar="BENCH_CPU_JSON", help="instead: simulate, on the CPU as device, "
                        "the settings of a committed CPU bench file, beside its measured peak RSS per stage")
    args = parser.parse_args(argv)
    if args.explain_rss:
        return explain_rss(Path(args.explain_rss), args.presets, argv)
    settings = SimSettings()
    result = {"kind": "simulation proof", "model": args.model, "side": args.side, "settings": settings.__dict__,
              "env": environment("python benchmarks/sim_proof.py " + " ".join(argv)), "presets": {}}
    for name in args.presets.split(","):
        preset = preset_named(name)
        real = measure_real(args.model, preset, args.side, settings)
        fake = simulate_preset(args.model, preset, args.side, settings, host="cpu")
        rows = {}
        for stage in STAGES:
            r, f = real["stages"][stage], fake["stages"][stage]
            rows[stage] = {"real_peak_bytes": r["peak_allocated_bytes"], "fake_peak_bytes": f["peak_allocated_bytes"],
                           "fake_over_real": f["peak_allocated_bytes"] / r["peak_allocated_bytes"],
                           "real_flops": r["flops"], "fake_flops": f["flops"]}
            diff = rows[stage]["fake_over_real"] - 1
            print(f"{name:>9} {stage:>6}: real {r['peak_allocated_bytes'] / 2**30:.3f} GiB, fake "
                  f"{f['peak_allocated_bytes'] / 2**30:.3f} GiB ({diff:+.3%})", flush=True)
        result["presets"][name] = {"stages": rows, "real_seconds": real["seconds"],
                                   "fake_seconds": fake["seconds_to_simulate"]}
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stamp = result["env"]["date"][:19].replace(":", "").replace("-", "")
    arch = args.model.removeprefix("arch:")
    out = Path(__file__).resolve().parent / "results" / f"sim-proof-{arch}-{args.side}px-{stamp}.json"
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def explain_rss(path: Path, names: str, argv: list[str]) -> int:
    """A CPU bench measured peak RSS; the same settings simulated with the CPU as the device (encoders resident, fp32
    where the bench ran fp32) give the tensor bytes in it. The rest is the process: Python, torch, diffusers and
    their libraries, the allocator's retained pages (`start_bytes` of each stage shows the floor)."""
    from imagic_lite.bench import preset_of

    bench = json.loads(path.read_text())
    result = {"kind": "CPU peak RSS explained", "bench_file": path.name, "model": bench["model"],
              "env": environment("python benchmarks/sim_proof.py " + " ".join(argv)), "presets": {}}
    for name in names.split(","):
        entry = bench["presets"][name]
        fake = simulate_preset(bench["model"], preset_of(entry), entry["side"], SimSettings(), host="cpu")
        rows = {}
        for stage in STAGES:
            rss, sim = entry["stages"][stage], fake["stages"][stage]["peak_allocated_bytes"]
            rows[stage] = {"peak_rss_bytes": rss["peak_bytes"], "start_rss_bytes": rss["start_bytes"],
                           "tensor_bytes_simulated": sim, "rest_bytes": rss["peak_bytes"] - sim}
            print(f"{name:>6} {stage:>6}: RSS {rss['peak_bytes'] / 2**30:.2f} GiB, tensors {sim / 2**30:.2f} GiB, "
                  f"rest {(rss['peak_bytes'] - sim) / 2**30:.2f} GiB", flush=True)
        result["presets"][name] = {"side": entry["side"], "settings_overrides": entry.get("overrides"),
                                   "stages": rows}
    stamp = result["env"]["date"][:19].replace(":", "").replace("-", "")
    out = Path(__file__).resolve().parent / "results" / f"sim-rss-explained-{path.stem}-{stamp}.json"
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
