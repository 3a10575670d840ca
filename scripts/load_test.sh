#!/usr/bin/env bash
# Loopback load test (issue 6): starts adapterd with auth on and three tenants on the tiny test
# model, drives CLIENTS concurrent clients for SECONDS seconds mixing generate, stream, OpenAI
# chat, adapter upload/list, file upload and fine-tuning jobs, then checks every acknowledged
# upload is present and intact and every acknowledged job succeeds and serves, no 5xx and no
# connection errors, and peak RSS under MAX_RSS_MIB.
#   CLIENTS=32 DURATION=120 bash scripts/load_test.sh     # a longer run (BENCHMARKS.md)
# Builds in debug unless PROFILE=release. Only 127.0.0.1 is ever contacted.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS="${CLIENTS:-16}"
DURATION="${DURATION:-20}"
MAX_RSS_MIB="${MAX_RSS_MIB:-512}"
PROFILE="${PROFILE:-debug}"
flag=()
[ "$PROFILE" = release ] && flag=(--release)
target="${CARGO_TARGET_DIR:-target}/$PROFILE"
cargo build "${flag[@]}" --bin adapterd --example load_test
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg), profile $PROFILE"
timeout $((DURATION + 300)) "$target/examples/load_test" --bin "$target/adapterd" \
    --clients "$CLIENTS" --seconds "$DURATION" --max-rss-mib "$MAX_RSS_MIB"
