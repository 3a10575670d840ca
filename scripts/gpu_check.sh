#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (issue 8, "verify on a device"). That machine has
# no Rust toolchain and no network: build here with `scripts/setup_cuda.sh --build`, then carry
# the release binary, the model file and this script, and run it there. It finishes in about
# 8 minutes at most and writes under $OUT: gpu_check.log, status.txt, bench_gpu.json,
# completions_{gpu,cpu}.jsonl, server_gpu.log, and all.tar.gz with every file (the device tool
# returns at most 8 files).
#
#   OUT=/tmp/out BIN=target/release/adapterd MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf \
#       scripts/gpu_check.sh
#
# Getting the files there: the device tool carries at most 64 MiB per call (working tree + carry),
# and the binary (~76 MB stripped) and the model (98 MB) are bigger. So, here:
#   BIN=target/release/adapterd MODEL=/work/models/SmolLM2-135M-Instruct.Q4_1.gguf \
#       scripts/gpu_check.sh --pack          # -> .gpucarry/1 (adapterd.gz + model part), .gpucarry/2
# then two device calls back to back (the machine must still be warm for the second):
#   run(carry=[".gpucarry/1"], command="scripts/gpu_check.sh --stash")
#   run(carry=[".gpucarry/2"], command="scripts/gpu_check.sh", timeout_s=540)
# --stash copies the pieces to /tmp/adapterd-carry; the plain run stashes what it has, joins the
# pieces, checks SHA256SUMS and uses /tmp/adapterd-carry/{adapterd,model.gguf} unless BIN/MODEL
# are set.
#
# What it does:
#   1. nvidia-smi (device, driver, compute capability).
#   2. LD_LIBRARY_PATH from the Python environment's NVIDIA packages (site-packages/nvidia/cu13/lib
#      for CUDA 13 wheels, nvidia/*/lib for older per-library wheels); `ldd` must resolve all.
#   3. Serves with GPU_ARGS (default `--device cuda:0`), runs greedy completions (with
#      logprobs), checks the process holds GPU memory, trains a small SFT adapter through
#      /v1/finetune and generates with it, and runs the benchmark harness at 1, 8 and 32
#      concurrent streams with and without adapters.
#   4. Serves with CPU_ARGS (default `--device cpu`), runs the same completions and scores, and
#      compares the two servers' teacher-forced logprobs of five fixed texts (echo, max_tokens
#      0): every token within SCORE_MAX_TOL, the mean within SCORE_MEAN_TOL. Greedy agreement
#      is reported, not required: candle's quantized matmul rounds activations to 8 bits where
#      the CPU kernels round to 16, which moves logprobs by up to ~0.3 at a few tokens and can
#      flip near-tied greedy choices (measured with model.kernels = "portable" on the CPU).
#
# The benchmark is `adapterd bench --url URL --concurrency 1,8,32 --modes base --model-file MODEL
# --server-pid PID --json FILE` (src/bench/mod.rs; docs/benchmarking.md). BENCH_MODES picks the
# modes (the adapter modes make their adapters from --model-file); BENCH_ARGS adds flags, e.g.
# `-p 16 -m 32` to shorten it.
set -euo pipefail

cd "$(dirname "$0")/.."
PACK=".gpucarry"
STASH="/tmp/adapterd-carry"

if [[ "${1:-}" == --pack ]]; then      # here: split binary + model into two carries of < 64 MiB
  BIN="${BIN:-target/release/adapterd}"
  MODEL="${MODEL:-/work/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
  rm -rf "$PACK"; mkdir -p "$PACK/1" "$PACK/2"
  strip -o "$PACK/adapterd" "$BIN"
  gzip -9 -c "$PACK/adapterd" > "$PACK/1/adapterd.gz"
  split -b 40M -d "$MODEL" "$PACK/model.gguf.part-"
  mv "$PACK/model.gguf.part-00" "$PACK/1/"; mv "$PACK"/model.gguf.part-* "$PACK/2/"
  (cd "$PACK" && sha256sum adapterd) > "$PACK/2/SHA256SUMS"
  (cd "$(dirname "$MODEL")" && sha256sum "$(basename "$MODEL")") | sed 's/ [^ ]*$/ model.gguf/' >> "$PACK/2/SHA256SUMS"
  rm "$PACK/adapterd"
  du -sh "$PACK"/1 "$PACK"/2
  exit 0
fi
stash() { mkdir -p "$STASH"; for d in "$PACK"/1 "$PACK"/2; do [[ -d "$d" ]] && cp -f "$d"/* "$STASH"/; done; return 0; }
if [[ "${1:-}" == --stash ]]; then stash; ls -la "$STASH"; exit 0; fi
stash
if [[ -z "${BIN:-}" && -z "${MODEL:-}" && -f "$STASH/SHA256SUMS" && -f "$STASH/adapterd.gz" ]]; then
  gzip -dc "$STASH/adapterd.gz" > "$STASH/adapterd" && chmod +x "$STASH/adapterd"
  cat "$STASH"/model.gguf.part-* > "$STASH/model.gguf"
  (cd "$STASH" && sha256sum -c SHA256SUMS) || { echo "FAIL: carried pieces do not match SHA256SUMS" >&2; exit 1; }
  BIN="$STASH/adapterd"; MODEL="$STASH/model.gguf"
fi

OUT="${OUT:-/tmp/adapterd-gpu-check}"
BIN="${BIN:-target/release/adapterd}"
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
GPU_ARGS="${GPU_ARGS:---device cuda:0}"
CPU_ARGS="${CPU_ARGS:---device cpu}"
BENCH_MODES="${BENCH_MODES:-base,n-adapters}"
BENCH_ARGS="${BENCH_ARGS:-}"
CONCURRENCY="${CONCURRENCY:-1,8,32}"
MAX_TOKENS="${MAX_TOKENS:-32}"
SCORE_MAX_TOL="${SCORE_MAX_TOL:-0.5}"
SCORE_MEAN_TOL="${SCORE_MEAN_TOL:-0.1}"
GPU_PORT="${GPU_PORT:-18601}"
CPU_PORT="${CPU_PORT:-18602}"

mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
WORK="$(mktemp -d /tmp/adapterd-gpu-check.XXXXXX)"
# Only 8 files come back from $OUT: details go to $RES, then the main ones and a tarball of all.
RES="$WORK/res"; mkdir -p "$RES"
START=$(date +%s)
SERVER_PID=""
STATUS="$RES/status.txt"
: > "$STATUS"
note() { echo "$*" | tee -a "$STATUS"; }
elapsed() { echo "$(( $(date +%s) - START ))s"; }

stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
finish() {
  stop_server
  for f in status.txt bench_gpu.json completions_gpu.jsonl completions_cpu.jsonl server_gpu.log; do
    [[ -f "$RES/$f" ]] && cp "$RES/$f" "$OUT/"
  done
  tar czf "$OUT/all.tar.gz" -C "$RES" . 2>/dev/null || true
  rm -rf "$WORK"; echo "finished after $(elapsed); results in $OUT"
}
trap finish EXIT

echo "== adapterd GPU check, $(date -u +%FT%TZ), on $(hostname)"
[[ -x "$BIN" ]] || { note "FAIL: binary $BIN missing"; exit 1; }
[[ -f "$MODEL" ]] || { note "FAIL: model $MODEL missing"; exit 1; }

# 1. The device.
echo "== nvidia-smi"
timeout 30 nvidia-smi | tee "$RES/nvidia-smi.txt" || note "WARN: nvidia-smi failed"
timeout 30 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv \
  | tee "$RES/gpu.csv" || true

# 2. The CUDA 13 libraries from the Python environment (libcuda.so.1 comes with the driver).
libdirs=""
for py in python3 python; do
  command -v "$py" >/dev/null || continue
  nv="$("$py" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)"
  [[ -n "$nv" ]] && break
done
for d in ${nv:+$nv/nvidia/cu13/lib $nv/nvidia/*/lib} /usr/local/lib/python3*/*-packages/nvidia/cu13/lib \
         /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [[ -d "$d" ]] && libdirs="${libdirs:+$libdirs:}$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$RES/env.txt"
ldd "$BIN" | tee "$RES/ldd.txt"
if grep -q 'not found' "$RES/ldd.txt"; then note "FAIL: unresolved libraries (see ldd.txt)"; exit 1; fi
"$BIN" --version | tee -a "$RES/env.txt"

# start_server NAME PORT ARGS...: start `adapterd serve`, wait for /ready (120 s).
start_server() {
  local name="$1" port="$2"; shift 2
  mkdir -p "$WORK/$name"
  echo "== serve ($name): $BIN serve --model $MODEL --bind 127.0.0.1:$port $*"
  "$BIN" serve --model "$MODEL" --bind "127.0.0.1:$port" \
    --database-url "sqlite://$WORK/$name/adapterd.db" --adapters-dir "$WORK/$name/adapters" "$@" \
    > "$RES/server_$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 240); do
    if curl -fsS --max-time 2 "http://127.0.0.1:$port/ready" > "$RES/ready_$name.json" 2>/dev/null; then
      echo "ready after $(elapsed): $(cat "$RES/ready_$name.json")"; return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      note "FAIL: $name server exited; last log lines:"; tail -20 "$RES/server_$name.log"; SERVER_PID=""; return 1
    fi
    sleep 0.5
  done
  note "FAIL: $name server not ready in 120 s"; tail -20 "$RES/server_$name.log"; return 1
}

# What each server completes greedily (with logprobs): `completions NAME PORT`, below.
PROMPTS=(
  "The capital of France is"
  "def fibonacci(n):"
  "Once upon a time, in a small village,"
  "The three primary colors are"
  "Water boils at a temperature of"
)
# post_each NAME PORT FILE MODE TEXT...: one /v1/completions call per text, one JSON line each in
# $RES/FILE_NAME.jsonl. MODE generate: greedy, MAX_TOKENS, logprobs; score: echo, max_tokens 0.
post_each() {
  local name="$1" port="$2" file="$3" mode="$4" model; shift 4
  model="$(curl -fsS --max-time 10 "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')" || return 1
  : > "$RES/${file}_$name.jsonl"
  for t in "$@"; do
    python3 -c 'import json,sys
model, text, mode, n = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3], int(sys.argv[4])
body = {"model": model, "prompt": text, "logprobs": 1}
body.update({"max_tokens": n, "temperature": 0} if mode == "generate" else {"max_tokens": 0, "echo": True})
print(json.dumps(body))' "$model" "$t" "$mode" "$MAX_TOKENS" \
      | curl -fsS --max-time 60 -H 'content-type: application/json' -d @- "http://127.0.0.1:$port/v1/completions" \
      >> "$RES/${file}_$name.jsonl" || return 1
    echo >> "$RES/${file}_$name.jsonl"
  done
}
completions() { post_each "$1" "$2" completions generate "${PROMPTS[@]}" && echo "$1 completions done after $(elapsed)"; }

# Texts both servers score teacher-forced (echo, nothing generated): per-token logprobs of the
# same tokens, so one rounding-level difference cannot send the two down different paths.
SCORED=(
  "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafés, and about two million people live in the city itself."
  "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
  "Once upon a time, in a small village, there lived a young girl who loved to read. Every evening she sat by the fire with a book."
  "The three primary colors are red, yellow and blue. Mixing two of them gives a secondary color: orange, green or purple."
  "Water boils at a temperature of 100 degrees Celsius at sea level; at higher altitudes the air pressure is lower and it boils sooner."
)
score_texts() { post_each "$1" "$2" scored score "${SCORED[@]}"; }

# finetune_smoke PORT: a 20-step SFT job on the server's device, then a generation with it.
finetune_smoke() {
  local port="$1" id status
  id="$(python3 -c 'import json; print(json.dumps({"method": "sft", "adapter_name": "gpu-smoke",
    "training_data": [{"prompt": "Say hi", "completion": "hi there"}, {"prompt": "Say bye", "completion": "bye now"}],
    "hyperparameters": {"rank": 8, "max_steps": 20, "batch_size": 2, "learning_rate": 0.002, "seed": 1}}))' \
    | curl -fsS --max-time 30 -H 'content-type: application/json' -d @- "http://127.0.0.1:$port/v1/finetune" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')" || { note "FAIL: finetune submit"; return 0; }
  for _ in $(seq 1 120); do
    status="$(curl -fsS --max-time 10 "http://127.0.0.1:$port/v1/finetune/$id" | tee "$RES/finetune_job.json" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" || status=unknown
    [[ "$status" == succeeded || "$status" == failed || "$status" == cancelled ]] && break
    sleep 1
  done
  curl -fsS --max-time 10 "http://127.0.0.1:$port/v1/finetune/$id/events" > "$RES/finetune_events.json" || true
  if [[ "$status" != succeeded ]]; then note "FAIL: GPU finetune job $status (finetune_job.json)"; return 0; fi
  if curl -fsS --max-time 30 -H 'content-type: application/json' \
       -d '{"prompt": "Say hi", "adapter_id": "gpu-smoke", "temperature": 0, "max_new_tokens": 8}' \
       "http://127.0.0.1:$port/v1/generate" > "$RES/finetune_generate.json"; then
    note "OK: GPU finetune succeeded after $(elapsed); its adapter answered: $(cat "$RES/finetune_generate.json")"
  else
    note "FAIL: generating with the trained adapter"
  fi
}

# 3. GPU: serve, completions, memory check, finetune, benchmark.
gpu_ok=0
if start_server gpu "$GPU_PORT" $GPU_ARGS; then
  gpu_ok=1
  timeout 30 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv \
    | tee "$RES/gpu_processes.csv" || true
  grep -q "^$SERVER_PID," "$RES/gpu_processes.csv" 2>/dev/null \
    && note "OK: server pid $SERVER_PID holds GPU memory" \
    || note "FAIL: server pid $SERVER_PID not listed by nvidia-smi (running on the CPU?)"
  grep -q '"device":"cuda' "$RES/ready_gpu.json" \
    && note "OK: /ready says $(cat "$RES/ready_gpu.json")" \
    || note "FAIL: /ready does not name a cuda device: $(cat "$RES/ready_gpu.json")"
  completions gpu "$GPU_PORT" || { note "FAIL: GPU completions"; gpu_ok=0; }
  score_texts gpu "$GPU_PORT" || { note "FAIL: GPU scoring"; gpu_ok=0; }
  grep -iE 'device|cuda' "$RES/server_gpu.log" | head -5 || true
  finetune_smoke "$GPU_PORT"
  echo "== bench (gpu)"
  # shellcheck disable=SC2086
  if timeout 240 "$BIN" bench --url "http://127.0.0.1:$GPU_PORT" --concurrency "$CONCURRENCY" \
       --modes "$BENCH_MODES" --model-file "$MODEL" --server-pid "$SERVER_PID" \
       --json "$RES/bench_gpu.json" $BENCH_ARGS > "$RES/bench_gpu.log" 2>&1; then
    note "OK: bench written to bench_gpu.json"; tail -20 "$RES/bench_gpu.log"
  else
    note "FAIL: bench (rc=$?), see bench_gpu.log"; tail -20 "$RES/bench_gpu.log"
  fi
  stop_server
fi

# 4. CPU: the same completions, then compare.
if start_server cpu "$CPU_PORT" $CPU_ARGS; then
  completions cpu "$CPU_PORT" || note "FAIL: CPU completions"
  score_texts cpu "$CPU_PORT" || note "FAIL: CPU scoring"
  stop_server
fi
if [[ $gpu_ok = 1 && -s "$RES/completions_cpu.jsonl" && -s "$RES/scored_cpu.jsonl" ]]; then
  python3 - "$RES" "$SCORE_MAX_TOL" "$SCORE_MEAN_TOL" <<'PY' | tee -a "$STATUS"
import json, sys
res, max_tol, mean_tol = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
load = lambda f: [json.loads(l) for l in open(f"{res}/{f}") if l.strip()]
# Greedy agreement is reported, not required: a rounding-level difference at a near tie sends
# the two servers down different (equally valid) paths.
for i, (g, c) in enumerate(zip(load("completions_gpu.jsonl"), load("completions_cpu.jsonl"))):
    gt, ct = g["choices"][0]["logprobs"]["tokens"], c["choices"][0]["logprobs"]["tokens"]
    same = next((k for k, (a, b) in enumerate(zip(gt, ct)) if a != b), min(len(gt), len(ct)))
    print(f"INFO: greedy prompt {i}: first {same}/{min(len(gt), len(ct))} tokens equal")
bad, diffs = 0, []
for i, (g, c) in enumerate(zip(load("scored_gpu.jsonl"), load("scored_cpu.jsonl"))):
    gl, cl = g["choices"][0]["logprobs"], c["choices"][0]["logprobs"]
    if gl["tokens"] != cl["tokens"]:
        bad += 1; print(f"FAIL: scored text {i}: the servers tokenized it differently"); continue
    d = [abs(a - b) for a, b in zip(gl["token_logprobs"], cl["token_logprobs"]) if a is not None and b is not None]
    diffs += d
    ok = max(d) <= max_tol
    bad += not ok
    print(f"{'OK' if ok else 'FAIL'}: scored text {i}: {len(d)} tokens, max |dlogprob| {max(d):.4f}, mean {sum(d)/len(d):.4f}")
mean = sum(diffs) / max(len(diffs), 1)
ok = bad == 0 and mean <= mean_tol
print(f"{'OK' if ok else 'FAIL'}: GPU vs CPU teacher-forced logprobs over {len(diffs)} tokens: mean |d| {mean:.4f} (tol {mean_tol}), max tol {max_tol}")
PY
else
  note "FAIL: no GPU/CPU comparison (a server, its completions or its scoring failed)"
fi

echo "== summary (status.txt)"
cat "$STATUS"
! grep -q '^FAIL' "$STATUS"
