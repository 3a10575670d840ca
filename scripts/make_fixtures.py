#!/usr/bin/env python3
"""Write tests/fixtures/smollm2_tokenizer.json: strings and the token ids that Hugging Face's
`tokenizers` library produces for them with SmolLM2's tokenizer, rebuilt from the default GGUF.

Why rebuild instead of asking `transformers`: its GGUF tokenizer converter does not know the
`smollm` pre-tokenizer (tokenizer.ggml.pre) and leaves digits grouped, which gives different ids
for some non-ASCII digits. SmolLM2's own tokenizer.json (and llama.cpp's llama-vocab.cpp
`smollm` case) split every digit on its own before the byte-level regex, so this script builds
exactly that: BPE(vocab, merges) + Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)] + ByteLevel decoder, with every token whose
GGUF token_type is not 1 (normal) registered as a special added token.

Rerun (from the repository root; needs Python >= 3.9 and the PyPI packages `tokenizers` and
`gguf`, which pulls in `numpy`):

    python3 -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install 'tokenizers>=0.21' 'gguf>=0.16'
    /tmp/fixture-venv/bin/python scripts/make_fixtures.py [PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

Without an argument the model is looked up where adapterd caches it
($XDG_CACHE_HOME/adapterd/models, else ~/.cache/adapterd/models); `adapterd fetch-model` puts
it there. The output is deterministic; commit it when it changes.
"""

import json
import os
import sys
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_tokenizer.json"

# Varied on purpose: each line exercises a different branch of the pre-tokenizer or the BPE.
STRINGS = [
    "",
    "Hello, world!",
    "What is the capital of France?",
    " leading space and trailing space ",
    "12345 + 678 = 13023",
    "3.14159e-10, 1,000,000 and 0x1F",
    "Arabic-Indic digits: \u0663\u0664\u0665 and \u0661\u0662",  # ٣٤٥ ١٢
    "Fullwidth \uff11\uff12\uff13 and superscript x\u00b2 \u2155 \u2167",  # １２３ ² ⅕ Ⅷ
    "Devanagari \u0967\u0968\u0969, Bengali \u09e7\u09e8",
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n\tprintln!(\"{}\", 1 << 3);\n}",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "multiple   spaces    here",
    "tabs\tand\t\ttabs\nnew\n\n\nlines\r\nwindows",
    "   \n\t  ",
    "trailing newline\n",
    "Emoji: \U0001F600\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 \u2764\ufe0f",
    "\u4e2d\u6587\u6587\u672c\uff1a\u4f60\u597d\uff0c\u4e16\u754c\uff01",  # 中文文本：你好，世界！
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00c5ngstr\u00f6m",
    "combining: e\u0301 a\u0308 n\u0303",
    "\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439, \u043c\u0438\u0440! \u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|endoftext|>",
    "not special: <|im_start |> <im_start>",
    "I'm sure they'll say it's John's, we've seen you'd",
    "URL https://example.com/path?q=1&r=two#frag and email a.b@c.org",
    "$$\\frac{a^2}{b_1} \\sum_{i=0}^{n} x_i$$",
    "ALL CAPS SHOUTING and MiXeD cAsE",
    "a" * 40 + " " + "ab" * 15,
    "\u00a0non-breaking\u2003em-space\u3000ideographic",
]


def default_model_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adapterd" / "models" / MODEL_FILE


def field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def build_tokenizer(path: Path) -> Tokenizer:
    reader = GGUFReader(str(path))
    model_type = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre")
    if model_type != "gpt2" or pre != "smollm":
        sys.exit(f"expected a gpt2/smollm tokenizer, found model={model_type!r} pre={pre!r}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty != 1]
    tok.add_special_tokens(specials)
    return tok


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_path()
    if not path.is_file():
        sys.exit(f"{path} not found: pass the .gguf path, or run `adapterd fetch-model` first")
    tok = build_tokenizer(path)
    ids = [tok.encode(s, add_special_tokens=True).ids for s in STRINGS]
    for s, i in zip(STRINGS, ids):
        # The byte-level decoder must give the text back exactly (nothing is normalised).
        assert tok.decode(i, skip_special_tokens=False) == s, s
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "model_file": MODEL_FILE,
        "generator": "scripts/make_fixtures.py (Hugging Face tokenizers; see its header)",
        "strings": STRINGS,
        "ids": ids,
    }
    # One string / one id list per line keeps diffs of the fixture readable.
    lines = ["{"]
    for key in ("model_file", "generator"):
        lines.append(f" {json.dumps(key)}: {json.dumps(doc[key])},")
    for key in ("strings", "ids"):
        items = [json.dumps(x, ensure_ascii=False, separators=(",", ":")) for x in doc[key]]
        lines.append(f' {json.dumps(key)}: [')
        lines.append(",\n".join("  " + it for it in items))
        lines.append(" ]," if key == "strings" else " ]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == doc
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(STRINGS)} strings to {OUT}")


if __name__ == "__main__":
    main()
