#!/usr/bin/env python3
"""Write the PEFT reference fixtures under tests/fixtures/peft/<name>/ that
tests/peft_reference.rs checks adapterd against: for each adapter, `adapter_config.json` and
`adapter_model.safetensors` exactly as PEFT's `save_pretrained` writes them, and
`expected.json`: for a few fixed prompts, the prompt's token ids, the greedy tokens PEFT itself
decodes with the adapter (12 new tokens) with each step's log-probability (log_softmax of the
float32 logits), and the base model's greedy tokens (to show the adapter changes the output).

The base is the f32 Hugging Face copy of adapterd's default model (SmolLM2-135M-Instruct
Q4_1, dequantized; q/k rows in Hugging Face order) that adapterd itself exports, so PEFT and
adapterd run on bit-identical weights. Everything loads from local files (no Hub access).

Two adapters, both with seeded random non-zero A and B (PEFT initialises B to zero, which
would leave the output unchanged):
  * lora_all7_r4: plain LoRA, r=4, lora_alpha=8 (scale 2), all seven projections
    (q/k/v/o/gate/up/down_proj) of layers 0 and 29 only (`layers_to_transform`); stored as f16.
  * rslora_r4: use_rslora=True, r=4, lora_alpha=16 (scale 16/sqrt(4) = 8), q/k/o/up/down_proj
    of layers 3, 14 and 25; `rank_pattern` gives down_proj rank 2 (scale 16/sqrt(2)) and
    `alpha_pattern` gives layer 14's k_proj alpha 8 (scale 4); stored as bf16.
A and B are drawn in f32, rounded to the storage dtype, and the reference is computed in f32
with those rounded values, so the stored file holds exactly the weights PEFT decoded with.
The half-precision storage keeps each adapter under 200 KB.

Reproduce (from the repository root):

    python3 -m venv /tmp/pyvenv
    /tmp/pyvenv/bin/pip install torch transformers peft safetensors   # CPU is enough
    cargo run --release --example export_hf -- /tmp/smollm2-f32      # fetches the default model
    /tmp/pyvenv/bin/python scripts/make_peft_reference.py /tmp/smollm2-f32

The versions of torch, transformers and peft used are recorded in each expected.json (PEFT
also writes its own version into adapter_config.json); the committed files were made on CPU.
Output is deterministic for given versions; commit it when it changes.
"""

import argparse
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peft"
NEW_TOKENS = 12

PLAIN_PROMPTS = ["The quick brown fox", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = [
    {
        "name": "lora_all7_r4",
        "seed": 1234,
        "std": 0.12,
        "dtype": torch.float16,
        "config": dict(r=4, lora_alpha=8, target_modules=ALL7, layers_to_transform=[0, 29]),
    },
    {
        "name": "rslora_r4",
        "seed": 5678,
        "std": 0.1,
        "dtype": torch.bfloat16,
        "config": dict(
            r=4,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
            layers_to_transform=[3, 14, 25],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"layers.14.self_attn.k_proj": 8},
        ),
    },
]

def prompts(tok):
    out = []
    for text in PLAIN_PROMPTS:
        out.append({"text": text, "ids": tok(text, add_special_tokens=False)["input_ids"]})
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    out.append({"text": chat, "ids": tok(chat, add_special_tokens=False)["input_ids"]})
    return out


@torch.no_grad()
def greedy(model, ids, n=NEW_TOKENS):
    """Greedy decoding (the whole sequence recomputed each step, no KV cache, so nothing depends
    on the cache API of the transformers version): chosen ids and float32 log-probabilities."""
    toks, lps = [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + toks]), use_cache=False).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        best = int(torch.argmax(logits))
        toks.append(best)
        lps.append(float(logp[best]))
    return toks, lps


def randomise(model, seed, std, dtype):
    """Seeded random A and B (normal, standard deviation `std`: large enough that greedy output
    visibly changes, which main() checks, small enough that it stays text rather than noise)
    for every LoRA module, rounded to `dtype`-representable values (kept as f32 for the
    reference run). Returns the number of adapted modules."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, module in sorted(model.named_modules()):
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a = module.lora_A["default"].weight
        b = module.lora_B["default"].weight
        a.data = (torch.randn(a.shape, generator=g) * std).to(dtype).float()
        b.data = (torch.randn(b.shape, generator=g) * std).to(dtype).float()
        n += 1
    return n


def to_storage(model, dtype):
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            for p in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                p.data = p.data.to(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="the f32 Hugging Face export of the default model")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ps = prompts(tok)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }

    for spec in ADAPTERS:
        base = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        base_out = [greedy(base, p["ids"])[0] for p in ps]

        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **spec["config"])
        model = get_peft_model(base, cfg).eval()
        n_modules = randomise(model, spec["seed"], spec["std"], spec["dtype"])

        cases = []
        for p, base_toks in zip(ps, base_out):
            toks, lps = greedy(model, p["ids"])
            if toks == base_toks:
                sys.exit(f"{spec['name']}: the adapter does not change the output for {p['text']!r}")
            cases.append(
                {
                    "prompt": p["text"],
                    "prompt_ids": p["ids"],
                    "tokens": toks,
                    "logprobs": lps,
                    "text": tok.decode(toks),
                    "base_tokens": base_toks,
                    "base_text": tok.decode(base_toks),
                }
            )
            first = next(i for i, (x, y) in enumerate(zip(toks, base_toks)) if x != y)
            print(f"{spec['name']}: {p['text']!r} (differs from token {first})")
            print(f"  base:    {tok.decode(base_toks)!r}\n  adapted: {tok.decode(toks)!r}")

        out = Path(args.out) / spec["name"]
        out.mkdir(parents=True, exist_ok=True)
        to_storage(model, spec["dtype"])
        model.save_pretrained(out, safe_serialization=True)
        # PEFT writes a README.md model card; the fixture needs only the config and weights.
        (out / "README.md").unlink(missing_ok=True)
        expected = {
            "generator": "scripts/make_peft_reference.py",
            "versions": versions,
            "base": "f32 Hugging Face export of SmolLM2-135M-Instruct.Q4_1.gguf (examples/export_hf.rs)",
            "seed": spec["seed"],
            "std": spec["std"],
            "storage_dtype": str(spec["dtype"]).removeprefix("torch."),
            "adapted_modules": n_modules,
            "new_tokens": NEW_TOKENS,
            "cases": cases,
        }
        (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{spec['name']}: {n_modules} modules, {size} bytes in {out}")


if __name__ == "__main__":
    main()
