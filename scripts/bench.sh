#!/usr/bin/env bash
# Reproduces BENCHMARKS.md in one run: adapterd vs llama.cpp on the same GGUF file and threads.
#
#   scripts/bench.sh                      # defaults below
#   LLAMA_CPP_DIR=/path/to/bin MODEL=/path/model.gguf THREADS=2 scripts/bench.sh
#
# Needs: cargo, curl, and llama.cpp's llama-bench + llama-server built outside this repository
# (see BENCHMARKS.md for the build). The two servers never run at the same time: candle's
# spinning thread pool collapses when another process competes for the cores. Run it on a quiet
# machine; the load average before and after is printed so a busy run can be recognised.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LLAMA_CPP_DIR="${LLAMA_CPP_DIR:-/tmp/llamacpp/build/bin}"
THREADS="${THREADS:-2}"
CONCURRENCY="${CONCURRENCY:-1,4,8}"
PROMPT_TOKENS="${PROMPT_TOKENS:-128}"
MAX_TOKENS="${MAX_TOKENS:-128}"
REQUESTS_PER_STREAM="${REQUESTS_PER_STREAM:-2}"
OUR_PORT="${OUR_PORT:-18080}"
PEER_PORT="${PEER_PORT:-18081}"
OUT="${OUT:-$(mktemp -d /tmp/adapterd-bench.XXXXXX)}"
mkdir -p "$OUT"

START=$(date +%s)
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# wait_for URL LOG: poll until URL answers 200 (180 s), failing early if the server died.
wait_for() {
    local url="$1" log="$2"
    for _ in $(seq 1 360); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server exited early; last log lines:" >&2
            tail -20 "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "timed out waiting for $url" >&2
    tail -20 "$log" >&2
    exit 1
}

for tool in llama-bench llama-server; do
    [[ -x "$LLAMA_CPP_DIR/$tool" ]] || {
        echo "missing $LLAMA_CPP_DIR/$tool (set LLAMA_CPP_DIR; build steps in BENCHMARKS.md)" >&2
        exit 1
    }
done

echo "== build (cargo build --release; loadgen example)"
cargo build --release
cargo build --release --example loadgen
ADAPTERD="$ROOT/target/release/adapterd"
LOADGEN="$ROOT/target/release/examples/loadgen"
MODEL="${MODEL:-$("$ADAPTERD" fetch-model)}"

echo "== machine"
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes in src/ or Cargo.toml)')"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "nproc: $(nproc)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "model: $MODEL ($(du -h "$MODEL" | cut -f1))"
    echo "threads: $THREADS; concurrency: $CONCURRENCY; prompt ~$PROMPT_TOKENS tokens; $MAX_TOKENS new tokens; $REQUESTS_PER_STREAM requests per stream"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"

LG_COMMON=(--concurrency "$CONCURRENCY" --requests-per-stream "$REQUESTS_PER_STREAM"
    --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" --warmup --timeout-s 600)

echo "== adapterd (native API, --threads $THREADS)"
"$ADAPTERD" serve --model "$MODEL" --bind "127.0.0.1:$OUR_PORT" --threads "$THREADS" \
    --database-url "sqlite://$OUT/adapterd.db" --adapters-dir "$OUT/adapters" \
    >"$OUT/adapterd.log" 2>&1 &
SERVER_PID=$!
wait_for "http://127.0.0.1:$OUR_PORT/ready" "$OUT/adapterd.log"
"$LOADGEN" --api native --url "http://127.0.0.1:$OUR_PORT" --label adapterd \
    "${LG_COMMON[@]}" --json "$OUT/adapterd.json" | tee "$OUT/adapterd.md"
stop_server
echo "load average after adapterd: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

echo "== llama-bench (-p $PROMPT_TOKENS -n $MAX_TOKENS -t $THREADS)"
"$LLAMA_CPP_DIR/llama-bench" -m "$MODEL" -p "$PROMPT_TOKENS" -n "$MAX_TOKENS" -t "$THREADS" \
    -o json >"$OUT/llama-bench.json" 2>"$OUT/llama-bench.log"
jq -r '.[] | "| \(.model_type) | \(.n_threads) | \(if .n_gen == 0 then "pp\(.n_prompt)" else "tg\(.n_gen)" end) | \(.avg_ts | .*10 | round / 10) ± \(.stddev_ts | .*10 | round / 10) |"' \
    "$OUT/llama-bench.json" 2>/dev/null | { echo "| model | threads | test | tok/s |"; echo "|---|---|---|---|"; cat; } \
    | tee "$OUT/llama-bench.md" || cat "$OUT/llama-bench.json"

echo "== llama-server (-t $THREADS --parallel 8 -c 8192 --cont-batching)"
"$LLAMA_CPP_DIR/llama-server" -m "$MODEL" -t "$THREADS" --parallel 8 -c 8192 --cont-batching \
    --host 127.0.0.1 --port "$PEER_PORT" >"$OUT/llama-server.log" 2>&1 &
SERVER_PID=$!
wait_for "http://127.0.0.1:$PEER_PORT/health" "$OUT/llama-server.log"
"$LOADGEN" --api openai --url "http://127.0.0.1:$PEER_PORT" --label llama-server \
    "${LG_COMMON[@]}" --json "$OUT/llama-server.json" | tee "$OUT/llama-server.md"
stop_server
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

echo
echo "== summary"
cat "$OUT/machine.txt"
echo
cat "$OUT/adapterd.md"
tail -n +3 "$OUT/llama-server.md"
echo
cat "$OUT/llama-bench.md"
echo
"$LOADGEN" --compare "$OUT/adapterd.json" "$OUT/llama-server.json" \
    --llama-bench-json "$OUT/llama-bench.json" | tee "$OUT/ratios.md"
echo
echo "bench took $(( $(date +%s) - START )) s; results in $OUT"
