#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench — the peer of `scripts/bench.sh` — outside this
# repository, from the llama.cpp that the PyPI sdist of llama-cpp-python vendors (a pinned,
# checksummed source that pip can fetch from any machine; nothing is ever committed here).
#
#   scripts/build_llamacpp.sh            # prints the bin directory on its last line (stdout)
#   scripts/build_llamacpp.sh --check    # also starts llama-server on $MODEL and asks it for 4 tokens
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36, the version BENCHMARKS.md was measured
# with), LLAMACPP_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/adapterd-bench/llamacpp), JOBS
# (default 1: the machines these run on are shared), MODEL (for --check; default: the model
# `adapterd fetch-model` caches).
#
# Idempotent: a finished build is recognised by a stamp file and reused, so bench.sh can call
# this every time. The peer is built with -DGGML_NATIVE=ON (-march=native), as llama.cpp users
# build it; our binary stays portable and picks its kernels at run time.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adapterd-bench/llamacpp}"
JOBS="${JOBS:-1}"
DIR="$CACHE/$VERSION"
BIN="$DIR/build/bin"
STAMP="$DIR/.built"
CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1

log() { echo "build_llamacpp: $*" >&2; }

if [[ -f "$STAMP" && -x "$BIN/llama-server" && -x "$BIN/llama-bench" ]]; then
    log "already built: $BIN ($(cat "$STAMP"))"
else
    for tool in python3 cmake make c++ tar; do
        command -v "$tool" >/dev/null || { log "missing $tool"; exit 1; }
    done
    mkdir -p "$DIR"
    if [[ ! -f "$DIR/src/CMakeLists.txt" ]]; then
        log "downloading the llama-cpp-python $VERSION sdist"
        rm -rf "$DIR/dl" "$DIR/unpack" "$DIR/src"
        # `--no-binary llama-cpp-python` rather than `:all:`: pip still prepares the sdist's
        # metadata, and with `:all:` it would also build that step's build tools (cmake among
        # them) from source, which takes longer than llama.cpp itself.
        python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$VERSION" -d "$DIR/dl" >&2
        mkdir -p "$DIR/unpack"
        tar xzf "$DIR/dl/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/unpack"
        mv "$DIR/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
        rm -rf "$DIR/dl" "$DIR/unpack"
    fi
    log "configuring (GGML_NATIVE=ON, LLAMA_CURL=OFF)"
    # LLAMA_USE_PREBUILT_UI=OFF keeps the configure step from downloading a web UI; unknown
    # options are only warned about by older trees.
    cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
    log "building llama-server and llama-bench with $JOBS job(s); this takes a while"
    start=$(date +%s)
    cmake --build "$DIR/build" --config Release -j "$JOBS" --target llama-server llama-bench >&2
    echo "llama-cpp-python $VERSION, built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(($(date +%s) - start)) s" >"$STAMP"
    log "built: $BIN ($(cat "$STAMP"))"
fi

if [[ "$CHECK" == 1 ]]; then
    MODEL="${MODEL:-}"
    if [[ -z "$MODEL" ]]; then
        MODEL="$(find "${XDG_CACHE_HOME:-$HOME/.cache}/adapterd/models" /work/models -name '*.gguf' 2>/dev/null | head -1 || true)"
    fi
    [[ -f "$MODEL" ]] || { log "--check needs MODEL=/path/to/model.gguf"; exit 1; }
    PORT="${PORT:-18099}"
    "$BIN/llama-server" -m "$MODEL" -t 2 --host 127.0.0.1 --port "$PORT" >"$DIR/check.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
    for _ in $(seq 1 120); do
        curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { tail -20 "$DIR/check.log" >&2; exit 1; }
        sleep 0.5
    done
    curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"Hello","max_tokens":4,"n_predict":4,"ignore_eos":true,"temperature":0}' >&2
    echo >&2
    log "llama-server answered"
fi

echo "$BIN"
