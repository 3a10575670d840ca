#!/usr/bin/env bash
# Adapter benchmarks (issue 4), one run on this machine:
#  1. cold load: time to first token of the first request for a rank-16 adapter on all seven
#     modules (loaded from disk after a restart) minus the same request on the base model;
#  2. throughput: 8 streams over 8 distinct adapters against 8 streams on the base alone.
#
#   scripts/bench_adapters.sh            # MODEL defaults to `adapterd fetch-model`; THREADS=2
#
# Run it on a quiet machine: the load average is printed before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PORT=${PORT:-18090}
OUT="${OUT:-$(mktemp -d /tmp/adapterd-bench-adapters.XXXXXX)}"
mkdir -p "$OUT"
cargo build --release -q
cargo build --release -q --example loadgen --example make_adapter
BIN=target/release/adapterd
MODEL=${MODEL:-$($BIN fetch-model)}
URL="http://127.0.0.1:$PORT"
echo "commit: $(git rev-parse --short HEAD); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

SERVER=""
start() {
    $BIN serve --model "$MODEL" --bind "127.0.0.1:$PORT" --threads "$THREADS" \
        --database-url "sqlite://$OUT/db.sqlite" --adapters-dir "$OUT/adapters" >"$OUT/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 1 120); do curl -sf "$URL/ready" >/dev/null && return 0; sleep 0.5; done
    echo "server did not become ready" >&2; exit 1
}
stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop EXIT

for i in 0 1 2 3 4 5 6 7; do
    target/release/examples/make_adapter "$MODEL" "$OUT/src/a$i" 16 "$i" >/dev/null
done
start
for i in 0 1 2 3 4 5 6 7; do
    curl -sf "$URL/v1/adapters" -F "name=a$i" -F "adapter_config.json=@$OUT/src/a$i/adapter_config.json" \
        -F "adapter_model.safetensors=@$OUT/src/a$i/adapter_model.safetensors" >/dev/null
done
stop
start   # a fresh process: every adapter is cold

ttft() { # prompt-only request (1 new token): total time in ms
    curl -s -o /dev/null -w '%{time_total}' "$URL/v1/generate" \
        -d "{\"prompt\":\"Hello there, how are you today?\",\"max_new_tokens\":1,\"temperature\":0$1}" |
        awk '{printf "%.1f", $1*1000}'
}
ttft "" >/dev/null # warm the base path
echo "| adapter | first request ms (cold) | base request ms | added ms |"
echo "|---|---|---|---|"
added=()
for i in 0 1 2 3 4 5 6 7; do
    base=$(ttft "")
    cold=$(ttft ",\"adapter_id\":\"a$i\"")
    d=$(awk -v a="$cold" -v b="$base" 'BEGIN{printf "%.1f", a-b}')
    added+=("$d")
    echo "| a$i | $cold | $base | $d |"
done
printf '%s\n' "${added[@]}" | sort -n | awk '{v[NR]=$1} END{printf "cold load adds (p50 of 8): %.1f ms\n", (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}'

LG="target/release/examples/loadgen --api native --url $URL --concurrency 8 --requests-per-stream 2 --prompt-tokens 128 --max-tokens 128"
$LG --warmup --label base --json "$OUT/base.json"
$LG --label 8-adapters --adapters a0,a1,a2,a3,a4,a5,a6,a7 --json "$OUT/adapters.json"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
