#!/usr/bin/env python3
"""Time to answer chat requests that share a long system prompt, and how many prompt tokens the
server reused (usage.prompt_tokens_details.cached_tokens). Run it against a server with
engine.prefix_cache_bytes at its default and again at 0 (BENCHMARKS.md, "Prompt-prefix cache").

    python3 scripts/prefix_cache_bench.py --url http://127.0.0.1:8080 [--requests 8] [--words 480]
"""
import argparse
import json
import statistics
import time
import urllib.request

WORDS = "the quick brown fox jumps over the lazy dog and then runs back to the old farm".split()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--words", type=int, default=480, help="system prompt length in words")
    a = ap.parse_args()
    system = " ".join(WORDS[i % len(WORDS)] for i in range(a.words))
    model = json.load(urllib.request.urlopen(f"{a.url}/v1/models"))["data"][0]["id"]
    times = []
    for i in range(a.requests):
        body = json.dumps({
            "model": model, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"question number {i}: what is {i} plus {i}?"}],
        }).encode()
        t = time.perf_counter()
        req = urllib.request.Request(f"{a.url}/v1/chat/completions", body,
                                     {"content-type": "application/json"})
        usage = json.load(urllib.request.urlopen(req))["usage"]
        times.append(time.perf_counter() - t)
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        print(f"request {i}: {times[-1] * 1000:.1f} ms, prompt {usage['prompt_tokens']} tokens, "
              f"cached {cached}")
    print(f"first {times[0] * 1000:.1f} ms; median of the rest "
          f"{statistics.median(times[1:]) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
