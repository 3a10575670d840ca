#!/usr/bin/env bash
# Training benchmarks (issue 5), one run on this machine:
#  1. LoRA SFT throughput of our trainer (examples/train_speed) against PyTorch + PEFT
#     (scripts/bench_train_torch.py) on the same f32 weights: rank 16, alpha 32, all seven
#     projections, 8 sequences of 128 tokens per step, AdamW, THREADS threads each;
#  2. generation latency (single stream) with no job and with a fine-tuning job running.
#
#   PYTHON=/path/to/venv/bin/python scripts/bench_train.sh   # needs torch, transformers, peft
#   SKIP_THROUGHPUT=1 scripts/bench_train.sh                  # part 2 only
#
# Run it on a quiet machine: the load average is printed before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PORT=${PORT:-18092}
PYTHON=${PYTHON:-python3}
OUT="${OUT:-$(mktemp -d /tmp/adapterd-bench-train.XXXXXX)}"
mkdir -p "$OUT"
cargo build --release -q
cargo build --release -q --example train_speed --example export_hf
BIN=target/release/adapterd
MODEL=${MODEL:-$($BIN fetch-model)}
echo "commit: $(git rev-parse --short HEAD); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ -z "${SKIP_THROUGHPUT:-}" ]; then
echo "== 1. training throughput (tokens/s; median step)"
[ -f "$OUT/hf/model.safetensors" ] || target/release/examples/export_hf "$MODEL" "$OUT/hf" >/dev/null
# Ours on the f32 copy (the same weights PyTorch trains) and on the Q4_1 file it serves.
RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=1 target/release/examples/train_speed "$OUT/hf" 128 8 5 | tail -1 | tee "$OUT/ours_f32.json"
RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=1 target/release/examples/train_speed "$MODEL" 128 8 5 | tail -1 | tee "$OUT/ours_q4.json"
"$PYTHON" scripts/bench_train_torch.py --model-dir "$OUT/hf" --threads "$THREADS" --rank 16 --alpha 32 \
    --seq-len 128 --batch 8 --steps 5 | tail -1 | tee "$OUT/torch.json"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
d = sys.argv[1]
ours = json.load(open(f"{d}/ours_f32.json"))["tokens_per_s"]
q4 = json.load(open(f"{d}/ours_q4.json"))["tokens_per_s"]
t = json.load(open(f"{d}/torch.json"))
peer = t.get("tokens_per_s_at_median_step", t["tokens_per_s"])
print(f"ours f32 {ours:.1f} tok/s, ours Q4_1 {q4:.1f}, PyTorch+PEFT {peer:.1f}: ratio {ours/peer:.2f} (Q4_1 {q4/peer:.2f})")
PY
fi

echo "== 2. generation latency without and with a training job"
cat > "$OUT/bench.toml" <<TOML
[finetune]
threads = 1
TOML
$BIN serve --model "$MODEL" --bind "127.0.0.1:$PORT" --threads "$THREADS" --config "$OUT/bench.toml" \
    --database-url "sqlite://$OUT/db.sqlite" --adapters-dir "$OUT/adapters" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 120); do curl -sf "$URL/ready" >/dev/null && break; sleep 0.5; done
# The benchmark harness (docs/benchmarking.md): one stream, 4 requests of 64 + 64 tokens.
LG="$BIN bench --api native --url $URL --modes base -c 1 --requests-per-stream 4 --min-requests 4 --prompt-tokens 64 --max-tokens 64"
$LG --label idle --json "$OUT/idle.json"
python3 - > "$OUT/job.json" <<'PY'
import json
recs = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f" {2*i}."} for i in range(64)]
print(json.dumps({"method": "sft", "adapter_name": "bench", "training_data": recs,
                  "hyperparameters": {"max_steps": 10000, "batch_size": 8}}))
PY
JOB=$(curl -sf "$URL/v1/finetune" -d @"$OUT/job.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 1 120); do
    curl -sf "$URL/v1/finetune/$JOB" | grep -q '"step":[1-9]' && break; sleep 1
done
$LG --no-warmup --label with-job --json "$OUT/with_job.json"
curl -sf -X POST "$URL/v1/finetune/$JOB/cancel" >/dev/null
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"
