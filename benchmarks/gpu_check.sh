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
# autocast, and the end-to-end example under a memory limit, each under its own time limit, and
# prints a summary table last (ONLY=... reruns a subset). The limits add up to 8 min 5 s; a step
# that ignores the SIGINT at its limit is killed 10 s later, and the header and summary take a
# few seconds, so the whole check ends within 9 min 20 s: a device call with timeout_s 600 holds
# it. By estimate (ANCHORS.md's H100 numbers) it takes 4 to 6 min on an H100 or H200.
# On a machine without CUDA it runs the same steps on the CPU (the gpu tests then skip),
# which is how the script itself is checked in development.
#
# $OUT holds 7 files at most, because the device tool brings back only 8 from it: gpu_check.log
# (everything printed), summary.json (each step's status and its whole JSON result),
# memory_vs_speed.{json,csv,png} and model_size.{json,csv}, written as those steps go. The other
# steps' JSON, CSV and per-step logs go to a scratch folder ($GPU_CHECK_WORK, else a fresh one
# under /tmp); summary.json carries their JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS="$WORK/steps.tsv"
: >"$STEPS"

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $WORK/NAME.log.
# ONLY="name ..." runs just those steps (a rerun after a fix need not repeat the others).
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then
        return
    fi
    # A result left by an earlier run in a kept $OUT must not pass for this run's.
    rm -f "$OUT/$name".{json,csv,png} "$WORK/$name".{json,csv,log}
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STEPS"
}

main() {
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(cat /proc/sys/kernel/hostname 2>/dev/null); results in $OUT, scratch $WORK"
    echo "command: ${ONLY:+ONLY=\"$ONLY\" }bash benchmarks/gpu_check.sh"
    $PY - <<'PYEOF'
import torch
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
mem = (f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB"
       if torch.cuda.is_available() else "")
print(f"torch {torch.__version__}, device: {card}{mem}")
PYEOF
    local dev
    dev=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    # On the CPU every step only checks its script, and two torch threads on the loaded 2-core
    # development VM made a step up to 200 times slower than one (hook_overhead, 2026-11-29: 4 s
    # against 21 ms a step), which ran steps past their limits.
    [[ $dev == cpu ]] && export OMP_NUM_THREADS=1

    step gpu_tests 120 $PY -m pytest -m gpu -q --durations=15 -p no:cacheprovider tests
    step memory_vs_speed 150 $PY benchmarks/memory_vs_speed.py --time-budget 110 \
        --out "$OUT/memory_vs_speed.json"
    step model_size 80 $PY benchmarks/model_size.py --quick --out "$OUT/model_size.json"
    # The host time the hooks add per saved tensor, with CUDA's allocator reads in the loop. On the
    # CPU, where the step only checks the script, fewer rounds and one thread (see below).
    local hook=(--threads 0 --rounds 40)
    [[ $dev == cpu ]] && hook=(--threads 1 --rounds 8)
    step hook_overhead 60 $PY benchmarks/hook_overhead.py --device "$dev" "${hook[@]}" \
        --out "$WORK/hook_overhead.json"
    # What a block sends over the link at limit=0 under autocast, and what re-casting saves, as the
    # device's own kernels save it (seconds). The CPU's sequence is shorter (same check, a quarter
    # of the work): the full one can take over 30 s on a loaded 2-core VM.
    local link=()
    [[ $dev == cpu ]] && link=(--seq 256)
    step link_bytes 30 $PY benchmarks/link_bytes.py --device "$dev" "${link[@]}" \
        --out "$WORK/link_bytes.json"
    # The example under a limit far below the model's needs (~1.6 GB of fp32 weight and AdamW
    # state for the GPU size); on the CPU a tiny model keeps the step as a check of the script.
    local train
    if [[ $dev == cuda ]]; then
        train=(--n-layer 8 --n-embd 1024 --n-head 16 --seq-len 512 --batch 8 --limit 256MiB)
    else
        train=(--n-layer 2 --n-embd 64 --n-head 4 --seq-len 32 --batch 2 --limit 320KiB)
    fi
    step train_gpt 45 $PY examples/train_gpt.py --steps 20 --min-size 64KiB --no-progress \
        "${train[@]}" --json "$WORK/train_gpt.json"

    $PY benchmarks/summarize.py "$OUT" --steps "$WORK"
}

# Everything printed also goes to $OUT/gpu_check.log: the device tool returns only the output's
# tail, and the per-step logs stay in the scratch folder.
main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
