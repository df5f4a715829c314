#!/usr/bin/env bash
# The prepared GPU session for the VRAM/throughput benchmarks: one call, about 7-8 minutes on an H100.
#   1. SD 1.5 at 512 px, every shipped preset (paper first), 2 warm-up + 5 timed steps per stage, uncapped;
#      then fit/no-fit under 4/6/8/12 GiB caps (set_per_process_memory_fraction), running under a cap only the
#      presets the uncapped run cannot settle (see run_bench.py --fit-matrix).
#   2. SDXL at 1024 px, presets 12gb and 8gb, 1 warm-up + 3 timed steps, uncapped, then caps 12 and 8 GiB.
# Results: benchmarks/results/{bench,fit}-cuda-*.json (+ .md, .png), all of them also in $OUT/gpu-results.tar.gz.
#
# The device image has torch, transformers and matplotlib but not diffusers or bitsandbytes. Here, first:
#   bash benchmarks/gpu_check.sh prepare     # copies diffusers, peft, bitsandbytes (CUDA 13 library only) from
#                                            # .venv into .gpu-site/ (~35 MB, ignored through .git/info/exclude)
# then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-site"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    site=$(.venv/bin/python -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))")
    rm -rf .gpu-site && mkdir -p .gpu-site
    grep -qx "/.gpu-site/" .git/info/exclude 2>/dev/null || echo "/.gpu-site/" >> .git/info/exclude
    for pkg in diffusers peft bitsandbytes; do
        cp -r "$site/$pkg" "$site"/$pkg-*.dist-info .gpu-site/
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
run() { echo "+ $*"; "$@" || echo "!! exit $? from: $*"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY - <<'EOF' || exit 1
import bitsandbytes, diffusers, peft, torch, transformers
assert torch.cuda.is_available(), "no CUDA"
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "peft",
      peft.__version__, "transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__)
x = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
opt = bitsandbytes.optim.AdamW8bit([x])
x.sum().backward(); opt.step()
print("AdamW8bit on CUDA:", opt.state[x]["state1"].dtype)
EOF
    run timeout 330 $PY benchmarks/run_bench.py --model arch:sd15 --resolution 512 \
        --presets paper,cpu,24gb,12gb,8gb,6gb,4gb --steps 5 --warmup 2 --cap-gb 4,6,8,12 --fit-matrix
    run timeout 210 $PY benchmarks/run_bench.py --model arch:sdxl --resolution 1024 --no-paper \
        --presets 12gb,8gb --steps 3 --warmup 1 --cap-gb 12,8 --fit-matrix
    # simulated beside measured (#17): the shipped `bench --simulate` peaks against the allocator's, and the
    # card allowance's assumptions (context, reserved/allocated) against this card
    run $PY benchmarks/sim_check.py $(find benchmarks/results -newer "$marker" -name 'bench-cuda-*.json' | sort)
    new=$(find benchmarks/results -newer "$marker" -name '*.json' | sort)
    run $PY benchmarks/render.py $new
    tar czf "$OUT/gpu-results.tar.gz" $(find benchmarks/results -newer "$marker" -type f | sort)
    tar tzf "$OUT/gpu-results.tar.gz"
} 2>&1 | tee "$OUT/gpu_check.log"
