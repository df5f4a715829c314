"""Simulated beside measured, for the first GPU session (gpu_check.sh): per preset and stage the CUDA allocator peak,
the simulated peak (imagic-lite bench --simulate, as shipped) and their ratio; and what the card allowance assumes
(imagic_lite.vram: CUDA context 0.5 GiB, allocator 15 %) against what the card showed (context_bytes,
max_memory_reserved / max_memory_allocated).

    python benchmarks/sim_check.py benchmarks/results/bench-cuda-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 2**30


def main(argv: list[str]) -> int:
    from imagic_lite.bench import add_simulated
    from imagic_lite.vram import CONTEXT_BYTES, FRAGMENTATION

    for name in argv:
        result = json.loads(Path(name).read_text())
        if result.get("env", {}).get("device") != "cuda":
            continue
        add_simulated(result)
        context = result["env"].get("context_bytes")
        print(f"== {name}: {result['model']}; CUDA context {context / GiB if context else float('nan'):.2f} GiB "
              f"(assumed {CONTEXT_BYTES / GiB:.2f})")
        print(f"{'preset':>8} {'stage':>6} {'measured':>9} {'simulated':>9} {'sim/meas':>8} {'reserved/alloc':>14}")
        for preset, entry in result["presets"].items():
            for stage, rec in entry.get("stages", {}).items():
                meas, sim, res = rec.get("peak_bytes"), rec.get("simulated_bytes"), rec.get("reserved_bytes")
                ratio = f"{sim / meas:.3f}" if sim and meas and rec.get("fit") else "-"
                frag = f"{res / meas:.3f}" if res and meas else "-"
                print(f"{preset:>8} {stage:>6} {(meas or 0) / GiB:9.2f} {(sim or 0) / GiB:9.2f} {ratio:>8} "
                      f"{frag:>14}  (allowance assumes {1 + FRAGMENTATION:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
