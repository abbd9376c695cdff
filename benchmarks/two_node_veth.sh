#!/usr/bin/env bash
# A real two-node allreduce measurement on one machine (issue 5).
#
#     bash benchmarks/two_node_veth.sh [--rate 1gbit] [--size-mib 64] [--iters 5] [--warmup 1]
#                                      [--repeats 3] [--algorithms native,hierarchical,ring,multiring]
#                                      [--out DIR] [--quick] [--limit SECONDS]
#
# Needs root (network namespaces, veth, tc) and the project's Python (PYTHON, else the venv's, else
# python3). It builds two network namespaces, each one "node", joined by a veth pair whose two ends
# are limited with tc tbf to --rate (each direction). The veth ends get the private addresses
# 10.77.0.1/24 and 10.77.0.2/24, which exist only inside those namespaces: no traffic leaves them.
# Two ranks run in each namespace under torchrun (--nnodes 2 --nproc-per-node 2, static rendezvous
# on 10.77.0.1, Gloo bound to the veth with GLOO_SOCKET_IFNAME, DDL_LOCAL_SIZE=2). Traffic between
# the two ranks of one namespace goes to the namespace's own address and so over its loopback;
# only inter-node traffic crosses the limited veth. It probes the veth (one TCP stream), loopback
# (four streams at once, as hierarchical's intra-node phases load it) and the add throughput, runs
# benchmarks/allreduce.py, and prints, for the chosen size (64 MiB), each algorithm's bus bandwidth
# against native Gloo and its time against the inter-node link floor 2(m-1)/m x bytes / rate, with
# the cost model's prediction for the same setup beside it (benchmarks/veth_summary.py), and writes
# OUT/two_node_veth.json. Everything it creates is removed on exit (trap); every step runs under
# `timeout`. Exit status 3: this machine cannot do it (the message says why).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RATE=1gbit
SIZE_MIB=64
ITERS=5
WARMUP=1
REPEATS=3
ALGOS=native,hierarchical,ring,multiring
OUT=benchmarks/results/two_node_veth
LIMIT=420
QUICK=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --rate) RATE=$2; shift 2 ;;
        --size-mib) SIZE_MIB=$2; shift 2 ;;
        --iters) ITERS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --repeats) REPEATS=$2; shift 2 ;;
        --algorithms) ALGOS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --limit) LIMIT=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ $QUICK == 1 ]]; then
    ITERS=3; WARMUP=1; REPEATS=2; ALGOS=native,hierarchical; LIMIT=180
fi

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3); fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

COMMAND="bash benchmarks/two_node_veth.sh --rate $RATE --size-mib $SIZE_MIB --iters $ITERS"
COMMAND+=" --warmup $WARMUP --repeats $REPEATS --algorithms $ALGOS --out $OUT --limit $LIMIT"
if [[ $QUICK == 1 ]]; then COMMAND+=" --quick"; fi
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "command: $COMMAND"
echo "date: $DATE"
echo "device: cpu, $(nproc) cores, $(uname -r); two network namespaces on $(hostname)"

# --- can this machine do it? Say exactly why not, and stop. ---------------------------------
need() { echo "two_node_veth: cannot run here: $*" >&2; exit 3; }
[[ $(id -u) == 0 ]] || need "needs root for network namespaces, veth and tc (uid is $(id -u))"
command -v ip >/dev/null || need "'ip' is missing; install iproute2 (apt-get install -y iproute2)"
command -v tc >/dev/null || need "'tc' is missing; install iproute2 (apt-get install -y iproute2)"
BENCH=${ALLREDUCE_SCRIPT:-benchmarks/allreduce.py}  # override only to test the plumbing
[[ -f $BENCH ]] || need "$BENCH is missing"

NS_A=ddl2n_a_$$
NS_B=ddl2n_b_$$
VA=d2na$$
VB=d2nb$$
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
PORT=29611
PROBE_PORT=29612
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ns in "$NS_A" "$NS_B"; do
        # Whatever still runs inside our namespaces was started by this script.
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true  # deleting a namespace also deletes its veth end
        fi
    done
    exit "$rc"
}
trap cleanup EXIT INT TERM

# How each veth end is shaped (SHAPE=tbf|htb, for experiments; see the README notes).
SHAPE=${SHAPE:-tbf}
TBF_LATENCY=${TBF_LATENCY:-50ms}
shape() {  # shape NS DEV
    if [[ $SHAPE == htb ]]; then
        # (fq_codel, cake, netem and hfsc are not built into every kernel; htb and tbf are
        # the two that this one has.)
        ip netns exec "$1" tc qdisc add dev "$2" root handle 1: htb default 10 &&
            ip netns exec "$1" tc class add dev "$2" parent 1: classid 1:10 htb rate "$RATE"
    else
        ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 256kb \
            latency "$TBF_LATENCY"
    fi
}

ip netns add "$NS_A" || need "'ip netns add' failed (no CAP_SYS_ADMIN or no netns support)"
ip netns add "$NS_B"
ip link add "$VA" netns "$NS_A" type veth peer name "$VB" netns "$NS_B" \
    || need "'ip link add ... type veth' failed (kernel without veth support?)"
ip -n "$NS_A" addr add "$ADDR_A/24" dev "$VA"
ip -n "$NS_B" addr add "$ADDR_B/24" dev "$VB"
for pair in "$NS_A $VA" "$NS_B $VB"; do
    set -- $pair
    ip -n "$1" link set lo up
    ip -n "$1" link set "$2" up
    # tbf on each end's egress limits each direction of the "wire" to RATE.
    shape "$1" "$2" || need "tc on a veth failed (kernel without sch_tbf / sch_htb?)"
done
echo "link: $(ip netns exec "$NS_A" tc qdisc show dev "$VA" | tr '\n' ' ')"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# --- probe the links: veth (between namespaces) and loopback (inside one) --------------------
probe() {  # probe NS_SERVER NS_CLIENT ADDR PORT NBYTES OUTFILE: one TCP stream, bounded
    timeout 40 ip netns exec "$1" "$PY" benchmarks/veth_summary.py serve "$3" "$4" &
    local srv=$!
    timeout 40 ip netns exec "$2" "$PY" benchmarks/veth_summary.py probe "$3" "$4" "$5" >"$6"
    wait "$srv"
}
probe "$NS_B" "$NS_A" "$ADDR_B" "$PROBE_PORT" $((32 << 20)) "$OUT/veth_probe.json"
# Loopback as hierarchical's intra-node phases load it: two streams in each namespace at once.
LOOP_FILES=()
k=0
for spec in "$NS_A $ADDR_A" "$NS_A $ADDR_A" "$NS_B $ADDR_B" "$NS_B $ADDR_B"; do
    set -- $spec
    probe "$1" "$1" "$2" $((PROBE_PORT + 1 + k)) $((256 << 20)) "$OUT/loopback_probe_$k.json" &
    LOOP_FILES+=("$OUT/loopback_probe_$k.json")
    k=$((k + 1))
done
wait
"$PY" benchmarks/veth_summary.py combine "${LOOP_FILES[@]}" >"$OUT/loopback_probe.json"
"$PY" benchmarks/veth_summary.py reduce >"$OUT/reduce_probe.json"
echo "probes done: veth, loopback (4 streams at once), reduction; numbers in the summary below"

# --- the benchmark: 2 nodes x 2 ranks under torchrun ------------------------------------------
SIZES=$((SIZE_MIB << 20))
run_node() {  # run_node NODE_RANK NS IFNAME
    timeout --signal=TERM --kill-after=15 "$LIMIT" ip netns exec "$2" env \
        GLOO_SOCKET_IFNAME="$3" DDL_LOCAL_SIZE=2 OMP_NUM_THREADS=1 \
        "$PY" -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --node-rank "$1" \
        --master-addr "$ADDR_A" --master-port "$PORT" \
        "$BENCH" --backend gloo --algorithms "$ALGOS" --sizes "$SIZES" \
        --iters "$ITERS" --warmup "$WARMUP" --repeats "$REPEATS" --out "$OUT/allreduce.json" \
        >"$OUT/node$1.log" 2>&1
}
echo "running $BENCH on 2 nodes x 2 ranks (limit ${LIMIT}s; logs in $OUT/node*.log)"
run_node 0 "$NS_A" "$VA" & PIDS+=($!)
run_node 1 "$NS_B" "$VB" & PIDS+=($!)
rc=0
for pid in "${PIDS[@]}"; do wait "$pid" || rc=$?; done
PIDS=()
if [[ $rc != 0 ]]; then
    echo "two_node_veth: the benchmark failed (exit $rc); last lines of the logs:" >&2
    tail -n 20 "$OUT/node0.log" "$OUT/node1.log" >&2
    exit "$rc"
fi
grep -v '^\[W\|^W[0-9]\|^\*\*\*\*' "$OUT/node0.log" | tail -n 40 || true

RATE_BPS=$("$PY" -c "
import re, sys
m = re.fullmatch(r'([0-9.]+)([kmg]?)(bit|bps)', sys.argv[1].lower())
v = float(m[1]) * {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9}[m[2]]
print(v * (8 if m[3] == 'bps' else 1))" "$RATE")
"$PY" benchmarks/veth_summary.py summarize --allreduce "$OUT/allreduce.json" \
    --veth-probe "$OUT/veth_probe.json" --loop-probe "$OUT/loopback_probe.json" \
    --reduce-probe "$OUT/reduce_probe.json" \
    --rate-bps "$RATE_BPS" --size "$SIZES" --nodes 2 --local-size 2 \
    --command "$COMMAND" --date "$DATE" --out "$OUT/two_node_veth.json"
