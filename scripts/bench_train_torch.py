#!/usr/bin/env python3
"""LoRA SFT training throughput of PyTorch + PEFT on the CPU, as the baseline adapterd's own
trainer is compared against: the f32 Hugging Face copy of the default model, LoRA on the
chosen projections of every layer, AdamW, fixed deterministic data, f32 throughout.

Data: an English paragraph repeated and tokenized once; row i of the batch is the window of
`--seq-len` tokens starting at token 37·i (no padding, every row full). Labels are the input
ids, so the loss covers every token (transformers shifts them by one inside the model). The
same batch is used every step: this measures speed, not learning.

Prints one JSON line: tokens_per_s (batch·seq_len·steps / timed seconds), step_seconds_median
and tokens_per_s_at_median_step (batch·seq_len / median step seconds, robust to a noisy machine),
each timed step's seconds, first and last loss, the versions of torch/transformers/peft, and
every setting. The first `--warmup` steps are run but not timed.

Run (from the repository root; the model directory comes from examples/export_hf.rs):

    cargo run --release --example export_hf -- /tmp/smollm2-f32
    /work/pyvenv/bin/python scripts/bench_train_torch.py --model-dir /tmp/smollm2-f32 --threads 2
"""

import argparse
import json
import os
import platform
import statistics
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

PARAGRAPH = (
    "The river ran slowly past the old mill, where the miller's children used to sit on the "
    "stone wall and count the boats that drifted down towards the sea. In spring the water "
    "rose and carried branches, leaves and sometimes a lost bucket; in summer it fell so low "
    "that the stones of the ford showed through, green with moss. Nobody in the village could "
    "remember when the wheel had last turned, but everyone agreed that it would turn again "
    "one day, when somebody found the time and the money to mend it. "
)


def batch_ids(tok, batch, seq_len):
    ids = tok(PARAGRAPH, add_special_tokens=False)["input_ids"]
    need = 37 * (batch - 1) + seq_len
    stream = ids * (need // len(ids) + 1)
    rows = [stream[37 * i : 37 * i + seq_len] for i in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default=ALL7, help="comma-separated module names")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = [t for t in args.targets.split(",") if t]

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation=args.attn
    )
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(model, cfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    x = batch_ids(tok, args.batch, args.seq_len)

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.detach().item())
        if step >= args.warmup:
            times.append(dt)

    tokens = args.batch * args.seq_len * args.steps
    print(
        json.dumps(
            {
                "tokens_per_s": tokens / sum(times),
                "step_seconds_median": statistics.median(times),
                # Robust to the odd step slowed by other work on a shared machine.
                "tokens_per_s_at_median_step": args.batch * args.seq_len / statistics.median(times),
                "step_seconds": [round(t, 4) for t in times],
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "settings": {
                    "model_dir": os.path.basename(os.path.normpath(args.model_dir)),
                    "device": "cpu",
                    "dtype": "float32",
                    "threads": torch.get_num_threads(),
                    "rank": args.rank,
                    "alpha": args.alpha,
                    "targets": targets,
                    "seq_len": args.seq_len,
                    "batch": args.batch,
                    "steps": args.steps,
                    "warmup_steps": args.warmup,
                    "lr": args.lr,
                    "optimizer": "AdamW",
                    "attn_implementation": args.attn,
                    "trainable_params": n_trainable,
                    "cpu": platform.processor() or platform.machine(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
