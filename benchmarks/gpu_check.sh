#!/usr/bin/env bash
# The one GPU check of this project. Run from the repository root on a machine with one NVIDIA GPU:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT, else benchmarks/results/gpu_check
#     ONLY="gpu_tests train_gpt" bash benchmarks/gpu_check.sh   # just those steps
#
# It runs the gpu-marked tests, the memory-versus-speed sweep on issue 3's reference model (the
# configuration its targets are set for; about 90 s on an H100 by estimate), the quick variant of
# the model-size benchmark (the full one, `python benchmarks/model_size.py`, is a separate call of
# a few minutes), the hooks' host time per saved tensor, the link bytes of one block under
# autocast, and the end-to-end example under a memory limit, each under its own time limit so
# the whole check takes at most 8 min 5 s (ONLY=... reruns a subset), and prints a summary table
# last. On a machine without CUDA it runs the same steps on
# the CPU (the gpu tests then skip), which is how the script itself is checked in development.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS="$OUT/steps.tsv"
: >"$STEPS"

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
$PY - <<'PYEOF'
import torch
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
print(f"torch {torch.__version__}, device: {card}")
PYEOF

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.log.
# ONLY="name ..." runs just those steps (a rerun after a fix need not repeat the others).
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
}

step gpu_tests 120 $PY -m pytest -m gpu -q --durations=15 -p no:cacheprovider tests
step memory_vs_speed 150 $PY benchmarks/memory_vs_speed.py --time-budget 110 \
    --out "$OUT/memory_vs_speed.json"
step model_size 80 $PY benchmarks/model_size.py --quick --out "$OUT/model_size.json"
# The host time the hooks add per saved tensor, with CUDA's allocator reads in the loop.
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
step hook_overhead 60 $PY benchmarks/hook_overhead.py --device "$DEV" --threads 0 --rounds 40 \
    --out "$OUT/hook_overhead.json"
# What a block sends over the link at limit=0 under autocast, and what re-casting saves, as the
# device's own kernels save it (seconds).
step link_bytes 30 $PY benchmarks/link_bytes.py --device "$DEV" --out "$OUT/link_bytes.json"
# The example under a limit far below the model's needs (~1.6 GB of fp32 weight and AdamW
# state for the GPU size); on the CPU a tiny model keeps the step as a check of the script.
if $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    TRAIN=(--n-layer 8 --n-embd 1024 --n-head 16 --seq-len 512 --batch 8 --limit 256MiB)
else
    TRAIN=(--n-layer 2 --n-embd 64 --n-head 4 --seq-len 32 --batch 2 --limit 320KiB)
fi
step train_gpt 45 $PY examples/train_gpt.py --steps 20 --min-size 64KiB --no-progress \
    "${TRAIN[@]}" --json "$OUT/train_gpt.json"

$PY benchmarks/summarize.py "$OUT"
