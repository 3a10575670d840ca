#!/usr/bin/env bash
# The official `openai` Python client against a real adapterd server.
#
# Starts `adapterd serve` on a free loopback port with a throwaway database and adapters dir,
# waits for GET /ready, takes the model id from GET /v1/models and runs
# scripts/openai_client_test.py against http://127.0.0.1:PORT/v1 (chat and completions,
# streaming or not, usage, finish_reason, logprobs, echo scoring, seed, stop, include_usage,
# models.list, errors). Prints one line per check, then `N passed, M failed`; exits non-zero
# on any failure. The server is killed on exit.
#
# Needs: python3 (>= 3.8, with venv), network access to PyPI for `pip install openai` on the
# first run, cargo if the binary is missing.
# Env: ADAPTERD_BIN   server binary (default ${CARGO_TARGET_DIR:-target}/debug/adapterd, built
#                     with `cargo build` when missing)
#      MODEL          --model for the server (default: the built-in default model, which the
#                     binary fetches and caches itself on first use)
#      OPENAI_VENV    venv to create/reuse (default ${TMPDIR:-/tmp}/adapterd-openai-venv)
#      OPENAI_VERSION pip requirement for the client (default `openai`, i.e. the newest)
#      READY_TIMEOUT  seconds to wait for /ready (default 180)
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_BIN=${CARGO_TARGET_DIR:-target}/debug/adapterd
ADAPTERD_BIN=${ADAPTERD_BIN:-$DEFAULT_BIN}
OPENAI_VENV=${OPENAI_VENV:-${TMPDIR:-/tmp}/adapterd-openai-venv}
OPENAI_VERSION=${OPENAI_VERSION:-openai}
READY_TIMEOUT=${READY_TIMEOUT:-180}

log() { echo "openai_client_test: $*" >&2; }

# --- the client, in a reused venv ---------------------------------------------------------
if [ ! -x "$OPENAI_VENV/bin/python" ]; then
  log "creating venv $OPENAI_VENV"
  python3 -m venv "$OPENAI_VENV"
fi
PY="$OPENAI_VENV/bin/python"
if ! "$PY" -c 'import openai' 2>/dev/null || [ "$OPENAI_VERSION" != openai ]; then
  log "pip install $OPENAI_VERSION"
  "$PY" -m pip install --quiet --disable-pip-version-check "$OPENAI_VERSION"
fi

# --- the server ---------------------------------------------------------------------------
if [ ! -x "$ADAPTERD_BIN" ]; then
  if [ "$ADAPTERD_BIN" = "$DEFAULT_BIN" ]; then
    log "building $ADAPTERD_BIN"
    cargo build --bin adapterd
  else
    log "ADAPTERD_BIN=$ADAPTERD_BIN is not an executable"
    exit 1
  fi
fi

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
  # Leftover temp files are harmless; a failed cleanup must not fail the run.
  rm -rf "$WORK" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port (the kernel picks it; the tiny race until `serve` binds is acceptable).
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"

ARGS=(serve --bind "127.0.0.1:$PORT" --database-url "sqlite://$WORK/db" --adapters-dir "$WORK/adapters")
[ -n "${MODEL:-}" ] && ARGS+=(--model "$MODEL")
log "starting $ADAPTERD_BIN ${ARGS[*]}"
"$ADAPTERD_BIN" "${ARGS[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

http_get() { "$PY" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        sys.stdout.write(r.read().decode())
except Exception:
    sys.exit(1)
EOF
}

deadline=$((SECONDS + READY_TIMEOUT))
until http_get "$BASE/ready" >/dev/null; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "server exited before it was ready:"; cat "$WORK/server.log" >&2; exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "server not ready after ${READY_TIMEOUT}s:"; tail -n 50 "$WORK/server.log" >&2; exit 1
  fi
  sleep 0.5
done

MODEL_ID=$(http_get "$BASE/v1/models" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
log "ready on $BASE, model $MODEL_ID"

status=0
"$PY" scripts/openai_client_test.py "$BASE/v1" "$MODEL_ID" || status=$?
if [ "$status" -ne 0 ]; then
  log "failed; last server log lines:"; tail -n 30 "$WORK/server.log" >&2
fi
exit "$status"
