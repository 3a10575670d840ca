#!/usr/bin/env python3
"""What constrained decoding costs per token: one stream against a running adapterd.

Usage: structured_bench.py BASE_URL [ROUNDS]

Sends the same chat prompt greedily to /v1/generate as plain text, JSON mode, a JSON
schema, a schema of patterns, formats and numeric bounds, plus the schema with `logit_bias` +100 on tokens the schema refuses at every step
(which forces the whole-vocabulary check each step: the worst a client can make it cost), and
prints the median milliseconds per generated token of each (HTTP included). Rounds alternate
the modes so load drift hits each alike. `logit_bias` applies to JSON mode alike. Standard library only.
"""

import json
import statistics
import sys
import time
import urllib.request

BASE = sys.argv[1].rstrip("/")
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
PROMPT = [{"role": "user", "content": "Describe Paris as JSON with its name, country, population, "
           "languages, whether it is a capital, and its nickname."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
        "is_capital": {"type": "boolean"},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 24}, {"type": "null"}]},
    },
    "required": ["name", "country", "population", "languages", "is_capital", "nickname"],
    "additionalProperties": False,
}
# The same reply under patterns, formats and numeric bounds (tables instead of the plain-string
# fast path).
PATTERNED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$", "maxLength": 24},
        "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"},
        "founded": {"type": "string", "format": "date"},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "area_km2": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
        "website": {"type": "string", "format": "uri", "maxLength": 64},
    },
    "required": ["name", "country_code", "founded", "population", "area_km2", "website"],
    "additionalProperties": False,
}


def post(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


# Tokens that are letters-only words: refused by the schema wherever a key, number or
# punctuation is due, and favoured at +100 they are the model's first choice every step.
words = [t for t in range(2000, 4000)
         if post("/v1/detokenize", {"tokens": [t]}).get("text", "").strip().isalpha()][:300]
modes = {
    "plain": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "city", "schema": SCHEMA}}},
    "json_schema patterned": {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "city", "schema": PATTERNED}}},
    "json_object + logit_bias": {
        "response_format": {"type": "json_object"},
        "logit_bias": {str(t): 100 for t in words},
    },
    "json_schema + logit_bias": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
        "logit_bias": {str(t): 100 for t in words},
    },
}
times = {m: [] for m in modes}
last = {}
for _ in range(ROUNDS):
    for mode, extra in modes.items():
        body = {"messages": PROMPT, "max_new_tokens": 96, "temperature": 0, **extra}
        start = time.perf_counter()
        r = post("/v1/generate", body)
        elapsed = time.perf_counter() - start
        n = r["usage"]["completion_tokens"]
        times[mode].append(elapsed * 1000 / max(n, 1))
        last[mode] = (n, r["finish_reason"], r["text"])
for mode, ms in times.items():
    print(f"{mode:28s} {statistics.median(ms):6.2f} ms/token  ({', '.join(f'{x:.2f}' for x in ms)})"
          f"  last: {json.dumps(last[mode])}")
