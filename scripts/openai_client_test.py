#!/usr/bin/env python3
"""The official `openai` Python client against adapterd's OpenAI-compatible /v1.

Usage: openai_client_test.py BASE_URL MODEL
  BASE_URL  e.g. http://127.0.0.1:8080/v1
  MODEL     the served model's id (from GET /v1/models)

Every check goes through the client's parsed objects (`resp.choices[0].message.content`,
`chunk.choices[0].delta.content`, `resp.usage.total_tokens`, ...), and checks the Python type
of each field it reads: the client builds its models without validation, so a field the server
sends with the wrong type would otherwise slip through. Prints one line per check and ends
with `N passed, M failed`; exits non-zero on any failure. Generations stay short
(max_tokens <= 16) so the whole run is short on the default model.
"""

import asyncio
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI, AsyncOpenAI

if len(sys.argv) != 3:
    sys.exit(__doc__)
BASE_URL, MODEL = sys.argv[1], sys.argv[2]

# No retries: a 429/5xx must show up as a failure, not be papered over.
client = OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)

CHAT_MSGS = [{"role": "user", "content": "Write one sentence about the sea."}]
LONG_MSGS = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
CHAT_N = 16  # max_tokens of the chat requests
CMPL_N = 10  # max_tokens of the completion requests
PROMPT = "The capital of France is Paris. The capital of Germany is"

# Known gaps (checks of real incompatibilities not fixed yet) print XFAIL and do not count as
# failures unless ADAPTERD_OPENAI_STRICT=1; once fixed they print PASS and count as passed.
STRICT = os.environ.get("ADAPTERD_OPENAI_STRICT") == "1"

passed = 0
failed = 0
xfailed = 0


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check(name, known_gap=False):
    """Decorator: runs the check at once and records the outcome as one line."""

    def run(fn):
        global passed, failed, xfailed
        t0 = time.monotonic()
        try:
            detail = fn()
            passed += 1
            print(f"PASS {name} [{time.monotonic() - t0:.1f}s]" + (f" — {detail}" if detail else ""), flush=True)
            return fn
        except CheckFailed as e:
            why, exc = str(e), None
        except Exception as e:  # noqa: BLE001 — any client/server surprise is a failure
            why, exc = f"{type(e).__name__}: {e}", e
        dt = time.monotonic() - t0
        if known_gap and not STRICT:
            xfailed += 1
            print(f"XFAIL {name} [{dt:.1f}s] — known gap: {why}", flush=True)
        else:
            failed += 1
            print(f"FAIL {name} [{dt:.1f}s] — {why}", flush=True)
            if exc is not None:
                traceback.print_exception(type(exc), exc, exc.__traceback__, limit=3, file=sys.stdout)
        return fn

    return run


def check_usage(u, max_completion=None, completion=None):
    expect(u is not None, "usage is missing")
    expect(isinstance(u, openai.types.CompletionUsage), f"usage is {type(u).__name__}")
    for f in ("prompt_tokens", "completion_tokens", "total_tokens"):
        expect(is_int(getattr(u, f)), f"usage.{f} is {getattr(u, f)!r}, not an int")
    expect(u.prompt_tokens > 0, f"usage.prompt_tokens = {u.prompt_tokens}")
    expect(
        u.total_tokens == u.prompt_tokens + u.completion_tokens,
        f"usage.total_tokens {u.total_tokens} != {u.prompt_tokens} + {u.completion_tokens}",
    )
    if max_completion is not None:
        expect(
            u.completion_tokens <= max_completion,
            f"completion_tokens {u.completion_tokens} > max_tokens {max_completion}",
        )
    if completion is not None:
        expect(u.completion_tokens == completion, f"completion_tokens {u.completion_tokens} != {completion}")
    d = u.prompt_tokens_details
    expect(d is not None and is_int(d.cached_tokens), f"usage.prompt_tokens_details = {d!r}")
    expect(0 <= d.cached_tokens < u.prompt_tokens, f"cached_tokens {d.cached_tokens} of {u.prompt_tokens}")


def check_chat(resp, max_tokens):
    expect(isinstance(resp, openai.types.chat.ChatCompletion), f"got {type(resp).__name__}")
    expect(isinstance(resp.id, str) and resp.id, f"id = {resp.id!r}")
    expect(resp.object == "chat.completion", f"object = {resp.object!r}")
    expect(is_int(resp.created), f"created = {resp.created!r}")
    expect(resp.model == MODEL, f"model = {resp.model!r}")
    expect(len(resp.choices) == 1, f"{len(resp.choices)} choices")
    c = resp.choices[0]
    expect(c.index == 0, f"index = {c.index!r}")
    expect(c.message.role == "assistant", f"role = {c.message.role!r}")
    expect(isinstance(c.message.content, str), f"content = {c.message.content!r}")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason = {c.finish_reason!r}")
    check_usage(resp.usage, max_completion=max_tokens)
    return c


def check_completion(resp, max_tokens):
    expect(isinstance(resp, openai.types.Completion), f"got {type(resp).__name__}")
    expect(isinstance(resp.id, str) and resp.id, f"id = {resp.id!r}")
    expect(resp.object == "text_completion", f"object = {resp.object!r}")
    expect(is_int(resp.created), f"created = {resp.created!r}")
    expect(resp.model == MODEL, f"model = {resp.model!r}")
    expect(len(resp.choices) == 1, f"{len(resp.choices)} choices")
    c = resp.choices[0]
    expect(c.index == 0, f"index = {c.index!r}")
    expect(isinstance(c.text, str), f"text = {c.text!r}")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason = {c.finish_reason!r}")
    check_usage(resp.usage, max_completion=max_tokens)
    return c


def check_chat_logprob_entry(e, top_n):
    expect(isinstance(e.token, str), f"token = {e.token!r}")
    expect(is_num(e.logprob) and e.logprob <= 1e-4, f"logprob = {e.logprob!r}")
    expect(
        isinstance(e.bytes, list) and all(is_int(b) and 0 <= b < 256 for b in e.bytes),
        f"bytes = {e.bytes!r}",
    )
    expect(bytes(e.bytes) == e.token.encode("utf-8") or "\ufffd" in e.token, f"bytes {e.bytes} do not spell {e.token!r}")
    expect(len(e.top_logprobs) == top_n, f"{len(e.top_logprobs)} top_logprobs, asked {top_n}")
    for t in e.top_logprobs:
        expect(isinstance(t.token, str), f"top token = {t.token!r}")
        expect(is_num(t.logprob) and t.logprob <= 1e-4, f"top logprob = {t.logprob!r}")
        expect(isinstance(t.bytes, list), f"top bytes = {t.bytes!r}")
    lps = [t.logprob for t in e.top_logprobs]
    expect(lps == sorted(lps, reverse=True), f"top_logprobs not in descending order: {lps}")


def check_completion_logprobs(lp, n_tokens, top_n, first_null=False):
    expect(lp is not None, "logprobs is missing")
    expect(isinstance(lp, openai.types.completion_choice.Logprobs), f"logprobs is {type(lp).__name__}")
    expect(isinstance(lp.tokens, list) and len(lp.tokens) == n_tokens, f"{len(lp.tokens or [])} tokens, expected {n_tokens}")
    expect(all(isinstance(t, str) for t in lp.tokens), f"tokens = {lp.tokens!r}")
    expect(len(lp.token_logprobs) == n_tokens, f"{len(lp.token_logprobs)} token_logprobs")
    expect(len(lp.top_logprobs) == n_tokens, f"{len(lp.top_logprobs)} top_logprobs")
    expect(len(lp.text_offset) == n_tokens, f"{len(lp.text_offset)} text_offset")
    off = 0
    for i, (tok, l, top, o) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset)):
        expect(is_int(o) and o == off, f"text_offset[{i}] = {o!r}, expected {off}")
        off += len(tok)
        if first_null and i == 0:
            expect(l is None, f"token_logprobs[0] = {l!r}, expected None for the first prompt token")
            continue
        expect(is_num(l) and l <= 1e-4, f"token_logprobs[{i}] = {l!r}")
        expect(isinstance(top, dict) and 1 <= len(top) <= top_n, f"top_logprobs[{i}] = {top!r}")
        expect(all(isinstance(k, str) and is_num(v) for k, v in top.items()), f"top_logprobs[{i}] = {top!r}")
        # The sampled/greedy or prompt token is at most as likely as the best alternative.
        expect(l <= max(top.values()) + 1e-3, f"token_logprobs[{i}] {l} > best top {max(top.values())}")


def stop_for(text):
    """A stop string taken from the middle of `text`, and the text expected before it."""
    words = text.split(" ")
    for k in range(len(words) // 2, len(words)):
        w = words[k].strip()
        if len(w) >= 2:
            s = " " + w[:2]
            i = text.find(s)
            if i > 0:
                return s, text[:i]
    return None, None


# ---------------------------------------------------------------------------------------------
print(f"openai {openai.__version__} against {BASE_URL}, model {MODEL}", flush=True)


@check("models.list")
def _():
    page = client.models.list()
    ids = [m.id for m in page]
    expect(MODEL in ids, f"{MODEL!r} not in {ids}")
    m = next(m for m in page if m.id == MODEL)
    expect(m.object == "model", f"object = {m.object!r}")
    expect(is_int(m.created), f"created = {m.created!r}")
    expect(isinstance(m.owned_by, str), f"owned_by = {m.owned_by!r}")
    return f"{len(ids)} model(s): {ids}"


@check("models.retrieve (GET /v1/models/{id})", known_gap=True)
def _():
    m = client.models.retrieve(MODEL)
    expect(m.id == MODEL and m.object == "model", f"{m!r}")


# ---- chat -----------------------------------------------------------------------------------
state = {}


@check("chat: non-streaming, usage, finish_reason")
def _():
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0)
    c = check_chat(r, CHAT_N)
    expect(c.message.content.strip(), "empty content")
    expect(c.logprobs is None, f"logprobs = {c.logprobs!r} though not asked")
    state["chat_greedy"] = c.message.content
    state["chat_greedy_finish"] = c.finish_reason
    state["chat_greedy_usage"] = r.usage
    return repr(c.message.content)


@check("chat: a repeated system prompt is reused (usage.prompt_tokens_details.cached_tokens)")
def _():
    system = {"role": "system", "content": "You answer questions about geography in one short sentence, "
              "naming the country and the continent, and never add anything else."}
    first = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "Where is Lima?"}], max_tokens=4, temperature=0)
    second = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "Where is Oslo?"}], max_tokens=4, temperature=0)
    check_usage(second.usage, max_completion=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    expect(cached >= 16 and cached % 16 == 0, f"cached_tokens = {cached} (first request: "
           f"{first.usage.prompt_tokens_details.cached_tokens})")
    return f"{cached} of {second.usage.prompt_tokens} prompt tokens reused"


@check("chat: max_tokens reached -> finish_reason length")
def _():
    r = client.chat.completions.create(model=MODEL, messages=LONG_MSGS, max_tokens=5, temperature=0)
    c = check_chat(r, 5)
    expect(c.finish_reason == "length", f"finish_reason = {c.finish_reason!r}")
    expect(r.usage.completion_tokens == 5, f"completion_tokens = {r.usage.completion_tokens}")


@check("chat: max_completion_tokens")
def _():
    r = client.chat.completions.create(model=MODEL, messages=LONG_MSGS, max_completion_tokens=3, temperature=0)
    c = check_chat(r, 3)
    expect(c.finish_reason == "length" and r.usage.completion_tokens == 3, f"{c.finish_reason}, {r.usage.completion_tokens} tokens")


@check("chat: streaming (role chunk, deltas == non-streamed text, finish_reason, no usage)")
def _():
    stream = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0, stream=True)
    parts, finishes, roles, n = [], [], [], 0
    ids = set()
    for chunk in stream:
        n += 1
        expect(isinstance(chunk, openai.types.chat.ChatCompletionChunk), f"chunk is {type(chunk).__name__}")
        expect(chunk.object == "chat.completion.chunk", f"object = {chunk.object!r}")
        expect(chunk.model == MODEL, f"model = {chunk.model!r}")
        expect(chunk.usage is None, f"usage {chunk.usage!r} without include_usage")
        ids.add(chunk.id)
        for ch in chunk.choices:
            if ch.delta.role is not None:
                roles.append(ch.delta.role)
            if ch.delta.content is not None:
                expect(isinstance(ch.delta.content, str), f"delta.content = {ch.delta.content!r}")
                parts.append(ch.delta.content)
            if ch.finish_reason is not None:
                finishes.append(ch.finish_reason)
    expect(len(ids) == 1, f"chunk ids differ: {ids}")
    expect(roles == ["assistant"], f"roles = {roles}")
    expect(finishes == [state["chat_greedy_finish"]], f"finish_reasons = {finishes}, non-streamed {state['chat_greedy_finish']!r}")
    text = "".join(parts)
    expect(text == state["chat_greedy"], f"streamed {text!r} != non-streamed {state['chat_greedy']!r}")
    return f"{n} chunks"


@check("chat: streaming with stream_options include_usage")
def _():
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    expect(len(usage_chunks) == 1, f"{len(usage_chunks)} chunks carry usage")
    last = chunks[-1]
    expect(last.usage is not None and last.choices == [], "the last chunk must carry usage and no choices")
    check_usage(last.usage, max_completion=CHAT_N)
    u0 = state["chat_greedy_usage"]
    expect(
        (last.usage.prompt_tokens, last.usage.completion_tokens) == (u0.prompt_tokens, u0.completion_tokens),
        f"stream usage {last.usage} != non-stream usage {u0}",
    )
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    expect(text == state["chat_greedy"], f"streamed {text!r} != {state['chat_greedy']!r}")
    return f"usage {last.usage.prompt_tokens}+{last.usage.completion_tokens}={last.usage.total_tokens}"


@check("chat: logprobs=True, top_logprobs=2")
def _():
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT_MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    c = check_chat(r, 8)
    expect(c.logprobs is not None and c.logprobs.content is not None, "choices[0].logprobs.content is missing")
    content = c.logprobs.content
    expect(len(content) == r.usage.completion_tokens, f"{len(content)} entries for {r.usage.completion_tokens} tokens")
    for e in content:
        check_chat_logprob_entry(e, 2)
        # Greedy: the chosen token is the most likely one.
        expect(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-3, f"greedy token {e.token!r} {e.logprob} is not top-1 {e.top_logprobs[0]}")
    if c.finish_reason == "length":
        joined = "".join(e.token for e in content)
        expect(joined == c.message.content, f"tokens join to {joined!r}, content {c.message.content!r}")
    expect(c.message.content == state["chat_greedy"][: len(c.message.content)], "logprobs changed the greedy text")
    return f"{len(content)} tokens, first {content[0].token!r} {content[0].logprob:.3f}"


@check("chat: logprobs=True without top_logprobs")
def _():
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=4, temperature=0, logprobs=True)
    c = check_chat(r, 4)
    for e in c.logprobs.content:
        check_chat_logprob_entry(e, 0)


@check("chat: streaming with logprobs")
def _():
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT_MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        stream_options={"include_usage": True},
    )
    entries, text = [], ""
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            if ch.logprobs is not None and ch.logprobs.content:
                entries.extend(ch.logprobs.content)
    check_usage(usage, max_completion=8)
    expect(len(entries) == usage.completion_tokens, f"{len(entries)} logprob entries for {usage.completion_tokens} tokens")
    for e in entries:
        check_chat_logprob_entry(e, 2)
    expect(text == state["chat_greedy"][: len(text)], f"streamed {text!r} is not a prefix of the greedy text")


@check("chat: logprobs bytes reassemble non-ASCII content", known_gap=True)
def _():
    r = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, logprobs=True,
        messages=[{"role": "user", "content": "Translate 'thank you' to Japanese, in Japanese script only."}],
    )
    c = r.choices[0]
    expect(any(ord(ch) > 127 for ch in c.message.content), f"no non-ASCII text to test: {c.message.content!r}")
    raw = b"".join(bytes(e.bytes) for e in c.logprobs.content)
    got = raw.decode("utf-8", errors="replace")
    # With finish_reason length the last character may be cut; compare what both have whole.
    want = c.message.content
    expect(got.startswith(want) or want.startswith(got.rstrip("\ufffd")),
           f"token bytes decode to {got!r}, content is {want!r} "
           f"(tokens {[(e.token, e.bytes) for e in c.logprobs.content][:4]}...)")


@check("chat: seed -> same text at temperature 1, other seeds differ")
def _():
    def gen(seed):
        r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=1.0, seed=seed)
        check_chat(r, CHAT_N)
        return r.choices[0].message.content

    a, b = gen(1234), gen(1234)
    expect(a == b, f"seed 1234 gave {a!r} then {b!r}")
    expect(any(gen(s) != a for s in (1, 2, 3)), f"four seeds all gave {a!r}: is temperature/seed ignored?")
    return repr(a)


@check("chat: stop string (excluded, finish_reason stop)")
def _():
    stop, before = stop_for(state["chat_greedy"])
    expect(stop is not None, f"no stop string could be taken from {state['chat_greedy']!r}")
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0, stop=[stop, "@@@"])
    c = check_chat(r, CHAT_N)
    expect(c.finish_reason == "stop", f"finish_reason = {c.finish_reason!r}")
    expect(c.message.content == before, f"{c.message.content!r} != {before!r} (stop {stop!r})")
    # The same in a stream, stop given as a plain string.
    s = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0, stop=stop, stream=True)
    chunks = list(s)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    fin = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    expect(text == before and fin == ["stop"], f"stream: {text!r}, {fin}")
    return f"stop {stop!r} -> {before!r}"


@check("chat: multi-turn with a system message")
def _():
    r = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a color."},
        ],
    )
    c = check_chat(r, 8)
    expect(r.usage.prompt_tokens > state["chat_greedy_usage"].prompt_tokens - 20, "prompt suspiciously short")
    return repr(c.message.content)


# ---- completions ----------------------------------------------------------------------------


@check("completions: non-streaming, usage, finish_reason")
def _():
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0)
    c = check_completion(r, CMPL_N)
    expect(c.text.strip(), "empty text")
    expect(c.logprobs is None, f"logprobs = {c.logprobs!r} though not asked")
    state["cmpl_greedy"] = c.text
    state["cmpl_greedy_finish"] = c.finish_reason
    state["cmpl_usage"] = r.usage
    return repr(c.text)


@check("completions: max_tokens reached -> finish_reason length")
def _():
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
    c = check_completion(r, 4)
    expect(c.finish_reason == "length" and r.usage.completion_tokens == 4, f"{c.finish_reason}, {r.usage.completion_tokens} tokens")


@check("completions: prompt as a one-element list and as token ids")
def _():
    r = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=CMPL_N, temperature=0)
    expect(check_completion(r, CMPL_N).text == state["cmpl_greedy"], "list prompt gave a different text")
    e = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    n = e.usage.prompt_tokens
    expect(n == state["cmpl_usage"].prompt_tokens, f"echo prompt_tokens {n} != {state['cmpl_usage'].prompt_tokens}")
    # Token ids via the server's tokenizer, through the client's generic POST.
    tok = client.post("/tokenize", body={"text": PROMPT, "add_special_tokens": False}, cast_to=object)
    ids = tok["tokens"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=CMPL_N, temperature=0)
    expect(check_completion(r, CMPL_N).text == state["cmpl_greedy"], f"token-id prompt gave {r.choices[0].text!r}")


@check("completions: a batch of prompts (strings and token-id lists) gives a choice per prompt")
def _():
    tok = client.post("/tokenize", body={"text": PROMPT, "add_special_tokens": False}, cast_to=object)
    for batch in ([PROMPT, "Once upon a time"], [tok["tokens"], tok["tokens"]]):
        r = client.completions.create(model=MODEL, prompt=batch, max_tokens=CMPL_N, temperature=0)
        expect([c.index for c in r.choices] == [0, 1], f"indexes {[c.index for c in r.choices]}")
        expect(r.choices[0].text == state["cmpl_greedy"], f"first prompt gave {r.choices[0].text!r}")
        expect(r.usage.prompt_tokens > state["cmpl_usage"].prompt_tokens, f"usage {r.usage}")


@check("completions: logprobs=2")
def _():
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0, logprobs=2)
    c = check_completion(r, CMPL_N)
    check_completion_logprobs(c.logprobs, r.usage.completion_tokens, 2)
    lp = c.logprobs
    for i, (l, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        expect(abs(l - max(top.values())) < 1e-3, f"greedy token {i} {lp.tokens[i]!r} {l} is not top-1 {top}")
    if c.finish_reason == "length":
        expect("".join(lp.tokens) == c.text, f"tokens join to {''.join(lp.tokens)!r}, text {c.text!r}")
    expect(c.text == state["cmpl_greedy"], "logprobs changed the greedy text")
    state["cmpl_first"] = (lp.tokens[0], lp.token_logprobs[0])
    return f"first {lp.tokens[0]!r} {lp.token_logprobs[0]:.3f}"


@check("completions: echo=True, max_tokens=0, logprobs=2 scores the prompt")
def _():
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    c = check_completion(r, 0)
    expect(c.text == PROMPT, f"text {c.text!r} != prompt")
    expect(r.usage.completion_tokens == 0, f"completion_tokens = {r.usage.completion_tokens}")
    check_completion_logprobs(c.logprobs, r.usage.prompt_tokens, 2, first_null=True)
    expect("".join(c.logprobs.tokens) == PROMPT, f"tokens join to {''.join(c.logprobs.tokens)!r}")
    # Scoring prompt + greedy continuation: its last token scores as it did when generated.
    tok, lp = state["cmpl_first"]
    r2 = client.completions.create(model=MODEL, prompt=PROMPT + tok, max_tokens=0, echo=True, logprobs=1)
    l2 = r2.choices[0].logprobs
    expect(l2.tokens[-1] == tok, f"last echoed token {l2.tokens[-1]!r} != generated {tok!r}")
    expect(abs(l2.token_logprobs[-1] - lp) < 0.05, f"scored {l2.token_logprobs[-1]} vs generated {lp}")
    total = sum(l for l in c.logprobs.token_logprobs[1:])
    return f"{r.usage.prompt_tokens} tokens, sum logprob {total:.2f}; {tok!r} scored {l2.token_logprobs[-1]:.3f} (generated {lp:.3f})"


@check("completions: echo scoring ranks a true sentence above a false one")
def _():
    def score(s):
        r = client.completions.create(model=MODEL, prompt=s, max_tokens=0, echo=True, logprobs=1)
        return r.choices[0].logprobs.token_logprobs[-1]

    good = score("The capital of France is Paris. The capital of Germany is Berlin")
    bad = score("The capital of France is Paris. The capital of Germany is banana")
    expect(good > bad, f"Berlin {good:.3f} <= banana {bad:.3f}")
    return f"Berlin {good:.3f} > banana {bad:.3f}"


@check("completions: echo=True with generation")
def _():
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, echo=True, temperature=0)
    c = check_completion(r, CMPL_N)
    expect(c.text == PROMPT + state["cmpl_greedy"], f"{c.text!r}")


@check("completions: streaming (text pieces == non-streamed text, finish_reason, no usage)")
def _():
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0, stream=True)
    parts, fins, n = [], [], 0
    for chunk in stream:
        n += 1
        expect(isinstance(chunk, openai.types.Completion), f"chunk is {type(chunk).__name__}")
        expect(chunk.object == "text_completion", f"object = {chunk.object!r}")
        expect(chunk.usage is None, "usage without include_usage")
        for ch in chunk.choices:
            expect(isinstance(ch.text, str), f"text = {ch.text!r}")
            parts.append(ch.text)
            if ch.finish_reason:
                fins.append(ch.finish_reason)
    expect("".join(parts) == state["cmpl_greedy"], f"streamed {''.join(parts)!r} != {state['cmpl_greedy']!r}")
    expect(fins == [state["cmpl_greedy_finish"]], f"finish_reasons {fins}")
    return f"{n} chunks"


@check("completions: streaming with include_usage and logprobs=2")
def _():
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0, stream=True, logprobs=2,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = [c.usage for c in chunks if c.usage is not None]
    expect(len(usage) == 1 and chunks[-1].usage is not None and chunks[-1].choices == [], "usage must come once, last, with no choices")
    check_usage(usage[0], completion=state["cmpl_usage"].completion_tokens)
    toks, lps = [], []
    for c in chunks:
        for ch in c.choices:
            if ch.logprobs is not None and ch.logprobs.tokens:
                toks += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
    expect(len(toks) == usage[0].completion_tokens, f"{len(toks)} logprob tokens for {usage[0].completion_tokens}")
    expect(all(is_num(l) for l in lps), f"token_logprobs {lps}")
    text = "".join(ch.text for c in chunks for ch in c.choices)
    expect(text == state["cmpl_greedy"], f"{text!r}")


@check("completions: seed -> same text at temperature 1")
def _():
    def gen(seed):
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=CMPL_N, temperature=1.0, seed=seed)
        return check_completion(r, CMPL_N).text

    a, b = gen(7), gen(7)
    expect(a == b, f"seed 7 gave {a!r} then {b!r}")
    expect(any(gen(s) != a for s in (8, 9, 10)), f"four seeds all gave {a!r}")
    return repr(a)


@check("completions: stop strings")
def _():
    text = state["cmpl_greedy"]
    stop, before = stop_for(text)
    expect(stop is not None, f"no stop string could be taken from {text!r}")
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0, stop=["@@@", stop])
    c = check_completion(r, CMPL_N)
    expect(c.finish_reason == "stop" and c.text == before, f"{c.text!r} ({c.finish_reason}) != {before!r} (stop {stop!r})")
    s = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0, stop=stop, stream=True))
    st = "".join(ch.text for c in s for ch in c.choices)
    fin = [ch.finish_reason for c in s for ch in c.choices if ch.finish_reason]
    expect(st == before and fin == ["stop"], f"stream: {st!r}, {fin}")
    return f"stop {stop!r} -> {before!r}"


# ---- errors ---------------------------------------------------------------------------------


def expect_error(fn, classes, status):
    try:
        fn()
    except classes as e:
        expect(e.status_code == status, f"status {e.status_code}, expected {status}")
        body = e.body
        expect(isinstance(body, dict) and isinstance(body.get("message"), str), f"error body {body!r}")
        return f"{type(e).__name__} {e.status_code}: {body.get('code')}: {body.get('message')}"
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"raised {type(e).__name__}: {e}, expected {[c.__name__ for c in classes]}")
    raise CheckFailed("no error raised")


@check("errors: unknown model (chat) -> NotFoundError")
def _():
    return expect_error(
        lambda: client.chat.completions.create(model="no-such-model", messages=CHAT_MSGS, max_tokens=4),
        (openai.NotFoundError,), 404,
    )


@check("errors: unknown model (completions, streaming) -> NotFoundError")
def _():
    return expect_error(
        lambda: list(client.completions.create(model="no-such-model", prompt="x", max_tokens=4, stream=True)),
        (openai.NotFoundError,), 404,
    )


@check("errors: max_tokens too large -> UnprocessableEntityError/BadRequestError")
def _():
    def call():
        client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=10_000_000)

    try:
        call()
    except (openai.UnprocessableEntityError, openai.BadRequestError) as e:
        expect(e.status_code in (400, 422), f"status {e.status_code}")
        expect("max_tokens" in str(e.body), f"message does not name the field: {e.body!r}")
        return f"{type(e).__name__} {e.status_code}: {e.body.get('message')}"
    raise CheckFailed("no error raised")


@check("n=3: three choices with indexes 0-2, usage summed over them")
def _():
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=4, n=3, seed=5)
    expect([c.index for c in r.choices] == [0, 1, 2], f"indexes {[c.index for c in r.choices]}")
    for c in r.choices:
        expect(isinstance(c.message.content, str), "content is a string")
    expect(is_int(r.usage.completion_tokens) and r.usage.completion_tokens <= 12, f"usage {r.usage}")
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, n=2, stream=True)
    seen = {ch.choices[0].index for ch in stream if ch.choices}
    expect(seen == {0, 1}, f"streamed indexes {seen}")


@check("errors: out-of-range n=17 and presence_penalty=2.5 are refused, not ignored")
def _():
    for kw in ({"n": 17}, {"presence_penalty": 2.5}):
        try:
            client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=4, **kw)
        except (openai.UnprocessableEntityError, openai.BadRequestError) as e:
            expect(e.status_code in (400, 422), f"{kw}: status {e.status_code}")
            continue
        raise CheckFailed(f"{kw} was accepted")


@check("logit_bias and penalties: the client's dict form steers the choice")
def _():
    # Token ids come from the completion's own logprobs: ban the greedy first token with -100
    # and the first token must change; force it with +100 and every token is that one.
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    first = base.choices[0].text
    expect(isinstance(first, str) and first, f"empty completion {first!r}")
    cmpl = client.chat.completions.create(
        model=MODEL, messages=CHAT_MSGS, max_tokens=4, temperature=0,
        presence_penalty=1.0, frequency_penalty=1.0,
    )
    expect(isinstance(cmpl.choices[0].message.content, str), "penalized chat has content")
    forced = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"1000": 100},
    )
    text = forced.choices[0].text
    unforced = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"1000": -100},
    )
    expect(text != unforced.choices[0].text, f"+100 and -100 on one token gave {text!r} both")
    expect(len(set(text.split())) <= 1, f"a forced token should repeat: {text!r}")
    return f"forced {text!r}"


@check("response_format json_object: the reply is one JSON object")
def _():
    msgs = [{"role": "user", "content": "Describe Paris as a JSON object with the keys country and population."}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=64, temperature=0,
        response_format={"type": "json_object"},
    )
    c = r.choices[0]
    content = c.message.content
    expect(isinstance(content, str) and content.lstrip().startswith("{"), f"content {content!r}")
    if c.finish_reason == "stop":
        obj = json.loads(content)
        expect(isinstance(obj, dict), f"not an object: {obj!r}")
    else:
        expect(c.finish_reason == "length", f"finish_reason {c.finish_reason}")
    return f"{c.finish_reason}: {content!r}"


def parse_reply(model_cls, content, max_tokens):
    """`chat.completions.parse` greedily; the reply must be complete and parse into model_cls."""
    # `parse` left `beta` in newer clients.
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    msgs = [{"role": "user", "content": content}]
    r = parse(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0,
              response_format=model_cls)
    c = r.choices[0]
    expect(c.finish_reason == "stop", f"finish_reason {c.finish_reason}: {c.message.content!r}")
    expect(isinstance(c.message.parsed, model_cls), f"parsed {c.message.parsed!r}")
    return c.message.parsed, c.message.content


@check("structured output: chat.completions.parse with a Pydantic model")
def _():
    from typing import List, Optional
    import pydantic
    from typing_extensions import Annotated

    Short = Annotated[str, pydantic.Field(max_length=24)]

    class City(pydantic.BaseModel):
        name: Short
        country: Short
        population: int
        languages: Annotated[List[Short], pydantic.Field(max_length=3)]
        is_capital: bool
        nickname: Optional[Short]

    city, content = parse_reply(City, "Describe Paris as JSON with its name, country, "
                                "population, languages, whether it is a capital, and its nickname.", 200)
    expect(list(json.loads(content)) == list(City.model_fields),
           f"keys out of the schema's order: {content!r}")
    msgs = [{"role": "user", "content": "Describe Paris."}]
    # A schema the server cannot enforce is refused, not ignored.
    expect_error(
        lambda: client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "pattern": "^(?=a)"}}}),
        (openai.UnprocessableEntityError, openai.BadRequestError), 422,
    )
    return f"{city!r}"


@check("structured output: Pydantic date, time, pattern and bounded fields")
def _():
    import datetime
    import re
    import pydantic
    from typing_extensions import Annotated

    class Booking(pydantic.BaseModel):
        guest: Annotated[str, pydantic.Field(max_length=24)]
        day: datetime.date
        arrival: datetime.time
        room: Annotated[str, pydantic.Field(pattern=r"^[A-D][0-9]{3}$")]
        nights: Annotated[int, pydantic.Field(ge=1, le=14)]
        rate: Annotated[float, pydantic.Field(gt=0, le=999.99)]

    booking, content = parse_reply(Booking, "Book room B204 for Ann on 14 July 2025, arriving at "
                                   "three in the afternoon, for 3 nights at 120.50 a night, as JSON.", 160)
    raw = json.loads(content)
    expect(re.fullmatch(r"[A-D][0-9]{3}", raw["room"]) is not None, f"room {raw['room']!r}")
    expect(re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw["day"]) is not None, f"day {raw['day']!r}")
    return f"{booking!r}"


@check("structured output: a Pydantic tuple (prefixItems) and a set of literals (uniqueItems)")
def _():
    from typing import Literal, Set, Tuple
    import pydantic

    class Place(pydantic.BaseModel):
        city: str
        lat_lon: Tuple[float, float]
        kinds: Set[Literal["capital", "port", "city"]]

    place, content = parse_reply(Place, "Give the city of Paris, its latitude and longitude, and "
                                 "what kind of place it is, as JSON.", 100)
    kinds = json.loads(content)["kinds"]
    expect(len(place.lat_lon) == 2 and len(kinds) == len(set(kinds)), f"parsed {content!r}")
    return f"{place!r}"


def weather_tools(unit):
    """A `get_weather(city[, unit])` tool, as OpenAI's documentation writes it."""
    props = {"city": {"type": "string", "maxLength": 32}}
    if unit:
        props["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    return [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": props, "required": list(props),
                       "additionalProperties": False}}}]


@check("tools: a named tool_choice calls with arguments that parse, streamed too; the result goes back")
def _():
    tools = weather_tools(unit=True)
    named = {"type": "function", "function": {"name": "get_weather"}}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice=named,
                                       max_tokens=64, temperature=0)
    c = r.choices[0]
    expect(c.finish_reason == "tool_calls", f"finish_reason {c.finish_reason}: {c.message}")
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    expect(call.function.name == "get_weather" and list(args) == ["city", "unit"], f"call {call}")
    expect(args["unit"] in ("celsius", "fahrenheit"), f"arguments {args}")
    # The same call streamed: the client's deltas carry the id, name and arguments.
    pieces, name = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, tools=tools,
                                                tool_choice=named, max_tokens=64, temperature=0,
                                                stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            name = d.function.name or name
            pieces.append(d.function.arguments or "")
    expect(name == "get_weather" and json.loads("".join(pieces)) == args, f"streamed {name} {pieces}")
    # The conversation goes on with the tool's result; the model may call again or answer.
    msgs += [{"role": "assistant", "content": None, "tool_calls": [{
                 "id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
             {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=64,
                                        temperature=0)
    c2 = r2.choices[0]
    expect(c2.finish_reason in ("stop", "tool_calls", "length"), f"finish_reason {c2.finish_reason}")
    then = c2.message.content if c2.message.tool_calls is None else c2.message.tool_calls[0].function
    return f"get_weather({args}); then {c2.finish_reason}: {then!r}"


@check("tools: parallel_tool_calls=True returns a list of calls, streamed alike")
def _():
    tools = weather_tools(unit=False)
    msgs = [{"role": "user", "content": "What is the weather in Paris and in Tokyo?"}]
    kw = dict(model=MODEL, messages=msgs, tools=tools, tool_choice="required",
              parallel_tool_calls=True, max_tokens=96, temperature=0)
    c = client.chat.completions.create(**kw).choices[0]
    expect(c.finish_reason == "tool_calls", f"finish_reason {c.finish_reason}: {c.message}")
    calls = c.message.tool_calls
    expect(1 <= len(calls) <= 8, f"{len(calls)} calls")
    cities = [json.loads(t.function.arguments)["city"] for t in calls]
    expect(len({t.id for t in calls}) == len(calls), "ids repeat")
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or []:
            streamed.setdefault(d.index, []).append(d.function.arguments or "")
    got = [json.loads("".join(streamed[i]))["city"] for i in sorted(streamed)]
    expect(got == cities, f"streamed {got} vs {cities}")
    return f"{len(calls)} calls: {cities}"


@check("errors: completions logprobs=6 -> refused")
def _():
    return expect_error(
        lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=6),
        (openai.UnprocessableEntityError, openai.BadRequestError), 422,
    )


@check("server still answers after the errors")
def _():
    r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0)
    c = check_chat(r, CHAT_N)
    expect(c.message.content == state["chat_greedy"], f"{c.message.content!r} != {state['chat_greedy']!r}")


# ---- concurrency ----------------------------------------------------------------------------


@check("concurrency: 4 threads, mixed chat/completions, batched greedy == sequential greedy")
def _():
    def one(i):
        if i % 2:
            r = client.chat.completions.create(model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0)
            check_chat(r, CHAT_N)
            return r.choices[0].message.content, state["chat_greedy"]
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CMPL_N, temperature=0)
        check_completion(r, CMPL_N)
        return r.choices[0].text, state["cmpl_greedy"]

    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(one, range(4)))
    for got, want in outs:
        expect(got == want, f"concurrent {got!r} != sequential {want!r}")
    return f"{len(outs)} answers"


@check("AsyncOpenAI: concurrent streams")
def _():
    async def main():
        ac = AsyncOpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)

        async def one():
            s = await ac.chat.completions.create(
                model=MODEL, messages=CHAT_MSGS, max_tokens=CHAT_N, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in s:
                usage = chunk.usage or usage
                for ch in chunk.choices:
                    text += ch.delta.content or ""
            return text, usage

        try:
            return await asyncio.gather(*(one() for _ in range(2)))
        finally:
            await ac.close()

    results = asyncio.run(main())
    for text, usage in results:
        expect(text == state["chat_greedy"], f"{text!r} != {state['chat_greedy']!r}")
        check_usage(usage, max_completion=CHAT_N)
    return f"{len(results)} streams"


if xfailed:
    print(f"({xfailed} known gap(s) reported as XFAIL, not counted; ADAPTERD_OPENAI_STRICT=1 counts them)", flush=True)
print(f"{passed} passed, {failed} failed", flush=True)
sys.exit(1 if failed else 0)
