#!/usr/bin/env bash
# The prepared GPU session: one call, under ten minutes on one H100/H200 (the phase timeouts sum to 550 s; the split
# is an estimate until a first session's log, which prints each run's seconds, rebalances it).
#   1. End to end (benchmarks/gpu_e2e.py): `imagic-lite run` for every preset on the full-size random-weight SD 1.5
#      (512 px) and SDXL (1024 px), 2 / 1 steps per stage, each preset capped at its card size (vram_gb). Any
#      exception fails the check loudly, naming model, preset and stage (results: e2e-cuda-*.json). Then 6gb and
#      4gb in fp16 (the path of cards without bf16: loss scaling on CUDA), since an H100/H200 picks bf16.
#   2. SD 1.5 at 512 px, every shipped preset (paper first), 1 warm-up + 3 timed steps per stage, uncapped;
#      then fit/no-fit under 4/6/8/12 GiB caps (set_per_process_memory_fraction), running under a cap only the
#      presets the uncapped run cannot settle (see run_bench.py --fit-matrix).
#   3. SDXL at 1024 px, presets 12gb and 8gb, 1 warm-up + 2 timed steps, uncapped, then caps 12 and 8 GiB.
# Results: benchmarks/results/{e2e,bench,fit}-cuda-*.json (+ .md, .png), also in $OUT/gpu-results.tar.gz.
# Any failed phase is listed at the end and the script exits 1.
#
# The device image has torch, transformers and matplotlib but not diffusers or bitsandbytes. Here, first:
#   bash benchmarks/gpu_check.sh prepare     # copies diffusers, peft, bitsandbytes (CUDA 13 library only) and
#                                            # the CLI's click and rich from .venv into .gpu-site/ (~50 MB,
#                                            # ignored through .git/info/exclude)
# then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-site"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    site=$(.venv/bin/python -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))")
    rm -rf .gpu-site && mkdir -p .gpu-site
    grep -qx "/.gpu-site/" .git/info/exclude 2>/dev/null || echo "/.gpu-site/" >> .git/info/exclude
    for pkg in diffusers peft bitsandbytes click rich markdown_it mdurl pygments; do
        cp -r "$site/$pkg" .gpu-site/
    done
    for dist in diffusers peft bitsandbytes click rich markdown_it_py mdurl pygments; do
        cp -r "$site"/$dist-*.dist-info .gpu-site/
    done
    find .gpu-site -name __pycache__ -prune -exec rm -rf {} +
    find .gpu-site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*_cpu.so' -delete
    du -sh .gpu-site
    exit 0
fi

OUT="${OUT:-/tmp/gpu-check-out}"
mkdir -p "$OUT" benchmarks/results
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
marker=$(mktemp)
failures="$OUT/failures.txt"
: > "$failures"
run() { echo "+ $*"; "$@" || { code=$?; echo "!! exit $code from: $*"; echo "exit $code: $*" >> "$failures"; }; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY - <<'EOF' || { echo "environment check failed" >> "$failures"; exit 1; }
import bitsandbytes, diffusers, peft, torch, transformers
assert torch.cuda.is_available(), "no CUDA"
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "peft",
      peft.__version__, "transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__)
x = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
opt = bitsandbytes.optim.AdamW8bit([x])
x.sum().backward(); opt.step()
print("AdamW8bit on CUDA:", opt.state[x]["state1"].dtype)
EOF
    run timeout 100 $PY benchmarks/gpu_e2e.py --model arch:sd15 --steps 2 --sample-steps 2
    run timeout 160 $PY benchmarks/gpu_e2e.py --model arch:sdxl --steps 1 --sample-steps 1
    run timeout 60 $PY benchmarks/gpu_e2e.py --model arch:sd15 --presets 6gb,4gb --weights fp16 --steps 3
    run timeout 150 $PY benchmarks/run_bench.py --model arch:sd15 --resolution 512 \
        --presets paper,cpu,24gb,12gb,8gb,6gb,4gb --steps 3 --warmup 1 --cap-gb 4,6,8,12 --fit-matrix
    run timeout 80 $PY benchmarks/run_bench.py --model arch:sdxl --resolution 1024 --no-paper \
        --presets 12gb,8gb --steps 2 --warmup 1 --cap-gb 12,8 --fit-matrix
    # simulated beside measured (#17): the shipped `bench --simulate` peaks against the allocator's, and the
    # card allowance's assumptions (context, reserved/allocated) against this card
    run $PY benchmarks/sim_check.py $(find benchmarks/results -newer "$marker" -name 'bench-cuda-*.json' | sort)
    new=$(find benchmarks/results -newer "$marker" -name '*.json' | sort)
    run $PY benchmarks/render.py $new
    tar czf "$OUT/gpu-results.tar.gz" $(find benchmarks/results -newer "$marker" -type f | sort)
    tar tzf "$OUT/gpu-results.tar.gz"
} 2>&1 | tee "$OUT/gpu_check.log"
if [ -s "$failures" ]; then
    echo "!! gpu_check FAILED (details above, and in the e2e-*.json results):"
    cat "$failures"
    exit 1
fi
echo "gpu_check: every phase passed"
