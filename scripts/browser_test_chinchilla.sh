#!/usr/bin/env bash
# Browser test of the scaling-law page (GET /chinchilla) in real headless Chromium.
#
# Starts the planner's router (the ignored `serve_for_browser_test` in tests/chinchilla.rs) on
# 127.0.0.1:0, starts Debian's headless `chromium` with a DevTools port on loopback, and runs
# scripts/browser_test_chinchilla.mjs, which loads the page, moves the slider (keyboard and
# mouse), picks a fit, types inference tokens, and checks every number shown against
# GET /v1/chinchilla. Exits non-zero on any failure.
#
# Needs: cargo, node >= 20 (no npm packages), chromium (`apt-get install -y chromium`).
# Env: CHROMIUM (browser path), SCREENSHOT (write a PNG of the final page there),
#      CARGO_TARGET_DIR (as for cargo).
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$CHROMIUM" ] || [ ! -x "$CHROMIUM" ]; then
  echo "browser_test_chinchilla: chromium not found (apt-get install -y chromium)" >&2
  exit 1
fi
command -v node >/dev/null || { echo "browser_test_chinchilla: node not found" >&2; exit 1; }
# Node 22+ has a global WebSocket; Node 20/21 need the flag.
NODE_FLAGS=()
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
  NODE_FLAGS=(--experimental-websocket)
fi

WORK=$(mktemp -d)
SERVER_PID=""
CHROME_PID=""
cleanup() {
  [ -n "$CHROME_PID" ] && kill "$CHROME_PID" 2>/dev/null || true
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  # Chromium's helper processes can outlive the browser for a moment and keep writing to the
  # profile: end any still naming this work directory, and never let cleanup decide the
  # script's exit status (a failed rm here once failed CI after every check had passed).
  pkill -f -- "$WORK" 2>/dev/null || true
  for _ in 1 2 3 4 5; do
    rm -rf "$WORK" 2>/dev/null && break
    sleep 0.5
  done
  return 0
}
trap cleanup EXIT

echo "browser_test_chinchilla: building tests/chinchilla.rs"
BIN=$(cargo test --test chinchilla --no-run --message-format=json \
  | node -e '
      let out = "";
      const lines = require("fs").readFileSync(0, "utf8").split("\n");
      for (const l of lines) {
        if (!l.startsWith("{")) continue;
        const m = JSON.parse(l);
        if (m.reason === "compiler-artifact" && m.target && m.target.name === "chinchilla"
            && m.profile && m.profile.test && m.executable) out = m.executable;
      }
      if (!out) process.exit(1);
      console.log(out);')

CHINCHILLA_PORT_FILE="$WORK/port" "$BIN" --ignored --exact serve_for_browser_test --nocapture \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

UDD="$WORK/chromium-profile"
mkdir -p "$UDD"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$UDD" --remote-debugging-address=127.0.0.1 --remote-debugging-port=0 \
  --window-size=1100,1200 about:blank >"$WORK/chromium.log" 2>&1 &
CHROME_PID=$!

for _ in $(seq 1 300); do
  [ -s "$WORK/port" ] && [ -s "$UDD/DevToolsActivePort" ] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "browser_test_chinchilla: server exited early" >&2; cat "$WORK/server.log" >&2; exit 1
  fi
  if ! kill -0 "$CHROME_PID" 2>/dev/null; then
    echo "browser_test_chinchilla: chromium exited early" >&2; cat "$WORK/chromium.log" >&2; exit 1
  fi
  sleep 0.1
done
if [ ! -s "$WORK/port" ] || [ ! -s "$UDD/DevToolsActivePort" ]; then
  echo "browser_test_chinchilla: server or chromium did not come up in 30 s" >&2
  cat "$WORK/server.log" "$WORK/chromium.log" >&2
  exit 1
fi
PORT=$(cat "$WORK/port")
CDP_PORT=$(sed -n 1p "$UDD/DevToolsActivePort")
CDP_PATH=$(sed -n 2p "$UDD/DevToolsActivePort")

node "${NODE_FLAGS[@]}" scripts/browser_test_chinchilla.mjs \
  "http://127.0.0.1:$PORT" "ws://127.0.0.1:$CDP_PORT$CDP_PATH"
