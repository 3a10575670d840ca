#!/usr/bin/env bash
# adapterd against llama.cpp in one run, on the same GGUF file and thread count, through the
# same harness (`adapterd bench`; manual: docs/benchmarking.md):
#
#   scripts/bench.sh                                  # the full default matrix (≈ 15 min)
#   CONCURRENCY=1,2 PROMPTS=16 MAX_TOKENS=8 scripts/bench.sh --min-requests 2 --cold-adapters 2
#
# One server at a time (two would fight over the cores): adapterd (release build) is started,
# the adapters are uploaded, adapterd is restarted so they are cold, the harness runs every
# mode; then llama-server runs the base scenarios; then llama-bench; then `adapterd bench
# compare` prints the ratios and writes results.json and throughput.svg into $OUT.
#
# Environment: MODEL (default: the model `adapterd fetch-model` caches), THREADS (2),
# CONCURRENCY (1,4,8,16), PROMPTS (16,500: approximate prompt tokens), MAX_TOKENS (128),
# MODES (base,one-adapter,n-adapters,cold; llama.cpp always runs base only), PEER_SLOTS (16),
# LLAMA_CPP_DIR (default: built or reused by scripts/build_llamacpp.sh), PEER=0 (skip
# llama.cpp), OUT (results directory; default a new /tmp/adapterd-bench.*), OUR_PORT, PEER_PORT,
# ADAPTERD (a prebuilt adapterd binary, e.g. an older commit's for an A/B run; skips the build),
# ADAPTERD_SETTINGS (TOML appended to adapterd's config, e.g. $'[engine]\nprefix_cache_bytes = 0').
# Extra arguments go to both harness runs (e.g. --min-requests, --requests-per-stream,
# --cold-adapters); give the matrix axes through the variables above, not as flags.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

THREADS="${THREADS:-2}"
CONCURRENCY="${CONCURRENCY:-1,4,8,16}"
PROMPTS="${PROMPTS:-16,500}"
MAX_TOKENS="${MAX_TOKENS:-128}"
MODES="${MODES:-base,one-adapter,n-adapters,cold}"
PEER_SLOTS="${PEER_SLOTS:-16}"
PEER="${PEER:-1}"
OUR_PORT="${OUR_PORT:-18080}"
PEER_PORT="${PEER_PORT:-18081}"
OUT="${OUT:-$(mktemp -d /tmp/adapterd-bench.XXXXXX)}"
mkdir -p "$OUT"
START=$(date +%s)

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT

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

if [[ -n "${ADAPTERD:-}" ]]; then
    echo "== using $ADAPTERD (no build)"
else
    echo "== build (cargo build --release)"
    cargo build --release
    ADAPTERD="${CARGO_TARGET_DIR:-$ROOT/target}/release/adapterd"
fi
MODEL="${MODEL:-$("$ADAPTERD" fetch-model)}"
if [[ "$PEER" != 0 ]]; then
    LLAMA_CPP_DIR="${LLAMA_CPP_DIR:-$(scripts/build_llamacpp.sh)}"
    for tool in llama-bench llama-server; do
        [[ -x "$LLAMA_CPP_DIR/$tool" ]] || { echo "missing $LLAMA_CPP_DIR/$tool" >&2; exit 1; }
    done
fi

LONGEST=$(tr ',' '\n' <<<"$PROMPTS" | sort -n | tail -1)
# Each llama-server slot gets ctx/slots tokens: room for the longest prompt (as its tokenizer
# counts it, give or take), the new tokens, and a margin.
PEER_CTX=$((PEER_SLOTS * (LONGEST + MAX_TOKENS + 64)))

echo "== machine"
{
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes in src/ or Cargo.toml)')"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "nproc: $(nproc); memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "model: $MODEL ($(du -h "$MODEL" | cut -f1))"
    echo "threads: $THREADS; streams: $CONCURRENCY; prompts ~$PROMPTS tokens; $MAX_TOKENS new tokens; modes: $MODES; extra: $*"
    [[ "$PEER" != 0 ]] && echo "llama.cpp: $LLAMA_CPP_DIR ($(cat "$LLAMA_CPP_DIR/../../.built" 2>/dev/null || echo 'own build')); -np $PEER_SLOTS -c $PEER_CTX"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"

COMMON=(-c "$CONCURRENCY" --prompt-tokens "$PROMPTS" --max-tokens "$MAX_TOKENS" "$@")

cat >"$OUT/adapterd.toml" <<EOF
[storage]
adapters_dir = "$OUT/adapters"
database_url = "sqlite://$OUT/adapterd.db"
jobs_dir = "$OUT/jobs"
${ADAPTERD_SETTINGS:-}
EOF
start_adapterd() {
    "$ADAPTERD" serve --config "$OUT/adapterd.toml" --model "$MODEL" \
        --bind "127.0.0.1:$OUR_PORT" --threads "$THREADS" >>"$OUT/adapterd.log" 2>&1 &
    SERVER_PID=$!
    wait_for "http://127.0.0.1:$OUR_PORT/ready" "$OUT/adapterd.log"
}

echo "== adapterd (--threads $THREADS, native API: its ignore_eos makes every request exactly $MAX_TOKENS tokens)"
start_adapterd
ADAPTER_FLAGS=()
if [[ "$MODES" != base ]]; then
    "$ADAPTERD" bench --url "http://127.0.0.1:$OUR_PORT" --modes "$MODES" "${COMMON[@]}" \
        --model-file "$MODEL" --prepare-adapters "$OUT/adapters.json"
    # A fresh process: nothing uploaded is resident, so the cold scenario measures real loads.
    stop_server
    start_adapterd
    ADAPTER_FLAGS=(--adapters-from "$OUT/adapters.json")
fi
"$ADAPTERD" bench --url "http://127.0.0.1:$OUR_PORT" --api native --label adapterd \
    --modes "$MODES" "${COMMON[@]}" "${ADAPTER_FLAGS[@]}" --server-pid "$SERVER_PID" \
    --json "$OUT/adapterd.json" | tee "$OUT/adapterd.md"
stop_server
echo "load average after adapterd: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

if [[ "$PEER" == 0 ]]; then
    echo "PEER=0: llama.cpp skipped; results in $OUT"
    exit 0
fi

echo "== llama-server (-t $THREADS -np $PEER_SLOTS -c $PEER_CTX)"
"$LLAMA_CPP_DIR/llama-server" -m "$MODEL" -t "$THREADS" -np "$PEER_SLOTS" -c "$PEER_CTX" \
    --host 127.0.0.1 --port "$PEER_PORT" >"$OUT/llama-server.log" 2>&1 &
SERVER_PID=$!
wait_for "http://127.0.0.1:$PEER_PORT/health" "$OUT/llama-server.log"
"$ADAPTERD" bench --url "http://127.0.0.1:$PEER_PORT" --api openai --label llama.cpp \
    --modes base "${COMMON[@]}" --server-pid "$SERVER_PID" \
    --json "$OUT/llamacpp.json" | tee "$OUT/llamacpp.md"
stop_server

echo "== llama-bench (-p $LONGEST -n $MAX_TOKENS -t $THREADS)"
"$LLAMA_CPP_DIR/llama-bench" -m "$MODEL" -p "$LONGEST" -n "$MAX_TOKENS" -t "$THREADS" \
    -o json >"$OUT/llama-bench.json" 2>"$OUT/llama-bench.log"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

echo
echo "== comparison"
cat "$OUT/machine.txt"
echo
"$ADAPTERD" bench compare "$OUT/adapterd.json" "$OUT/llamacpp.json" \
    --llama-bench "$OUT/llama-bench.json" --plot "$OUT/throughput.svg" \
    --json "$OUT/results.json" | tee "$OUT/comparison.md"
echo
echo "bench took $(($(date +%s) - START)) s; results in $OUT (plot: $OUT/throughput.svg)"
