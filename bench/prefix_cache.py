"""Prefix-cache benchmark (issue 16): the same workloads with TURSI_PREFIX_CACHE=0 and on.

    .venv/bin/python bench/prefix_cache.py [--runs 3] [--turns 5] [--streams 16]
    .venv/bin/python bench/prefix_cache.py --runs 1 --turns 2 --streams 4   # quick check

Each run starts a real gunicorn server of this repo (bench/serving.py's Server: gevent worker,
gunicorn.conf.py, the embedded model as it loads by default), sends one short unrelated
warm-up request (torch's first-call costs are not counted), measures both workloads, and
stops it. Runs alternate cache off (TURSI_PREFIX_CACHE=0) and on (the server's default size,
or --cache-size), one server at a time so that the two never share the cores; a fresh server
per run means every "on" run starts with a cold cache, so its first request pays the full
prefill as a real deployment's does.

1. Multi-turn: one chat conversation over /v1/chat/completions, streamed, greedy, with a
   --system-tokens (1,500) system prompt of numbered facts; each of --turns (5) turns sends
   the whole conversation so far (the previous answers as streamed back) and a new
   question, --max-tokens (64) at most per answer. Time to first token (the first SSE chunk
   with content) per turn, and median(TTFT of turns 2..N) / TTFT of turn 1 (issue 16's
   target with the cache on: <= 0.1x).
2. Shared system prompt: --streams (16) concurrent streams (threads), one
   --shared-tokens (1,000) system prompt and a distinct short question each, exactly
   --max-tokens new tokens (ignore_eos): TTFT p50/p95 and aggregate tok/s (all tokens /
   wall time). Targets, on against off: TTFT p50 <= 0.3x, tok/s >= 1.3x.

Printed: every run (per-turn TTFT, prompt tokens and the cached_tokens the server reported
in usage.prompt_tokens_details, "-" where it reported none), then the medians over --runs
of off and on and the ratios the issue judges. Not a test: the numbers depend on the
machine; read the ratios of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import requests
from serving import (
    DEFAULT_HOME,
    MODEL,
    Server,
    concurrently,
    median_of,
    model_path,
    percentile,
)

# --- prompts ---------------------------------------------------------------------------------

# Deterministic, varied facts (seeded choices), so that the prompt tokenizes as real
# text does (no run of one repeated token).
# fmt: off
PLACES = ["Port Mirren", "Calder Ridge", "the Ostrava valley", "Lake Veyla", "Dunmore",
          "the Saltmarsh islands", "Kessrin", "Bellhaven", "the Ardent plateau", "Tollworth"]
THINGS = ["lighthouse", "grain mill", "observatory", "rope bridge", "library", "clock tower",
          "ferry", "glass workshop", "weather station", "stone harbour"]
ACTIONS = ["was rebuilt", "was painted blue", "was moved two miles north", "was first opened",
           "was damaged by a storm", "was sold to the town", "was lit by gas lamps",
           "was measured by surveyors", "was closed for a winter", "was visited by the queen"]
PEOPLE = ["a crew of {n} carpenters", "{n} volunteers", "the mayor and {n} clerks",
          "{n} students", "a family of {n}", "{n} fishermen", "an engineer and {n} helpers"]
# fmt: on


def facts(seed: int, opening: str, tokens: int, tokenizer) -> tuple[str, int]:
    """A system prompt: `opening`, then numbered facts until it holds at least `tokens`
    tokens (counted with the model's tokenizer, without special tokens); and its count."""
    rng = random.Random(seed)
    text, count, number = opening, 0, 0
    while count < tokens:
        number += 1
        people = rng.choice(PEOPLE).format(n=rng.randint(2, 40))
        text += (
            f"\nFact {number}: the {rng.choice(THINGS)} in {rng.choice(PLACES)} "
            f"{rng.choice(ACTIONS)} in {rng.randint(1700, 2020)} by {people}."
        )
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, count


MULTI_TURN_OPENING = (
    "You are the archivist of a coastal province. Answer questions about the facts below "
    "briefly and only from them."
)
SHARED_OPENING = (  # differs from the first words on: no block of it is the other's
    "Reference sheet for the help desk of the regional heritage office. Use these records "
    "when a visitor asks about a building."
)

QUESTIONS = [
    "What happened in fact {n}?",
    "Which year does fact {n} give, and what else happened in that decade?",
    "Who did the work in fact {n}?",
    "Name another fact about the same place as fact {n}.",
    "Summarize fact {n} in five words.",
    "Is fact {n} older than fact {m}?",
    "Which building does fact {n} mention?",
    "Write one sentence a guide could say about fact {n}.",
]


def question(index: int) -> str:
    """The index-th question, about facts both prompts hold (the first 40); the first 40
    questions are distinct, later ones carry their number to stay so."""
    template = QUESTIONS[index % len(QUESTIONS)]
    text = template.format(n=1 + (7 * index) % 40, m=1 + (7 * index + 11) % 40)
    return text if index < 40 else f"{text} (question {index + 1})"


# --- one streamed chat -----------------------------------------------------------------------


def stream_chat(root: str, messages: list[dict], max_tokens: int, extra: dict | None = None):
    """One streamed greedy chat completion over /v1: its text, the time of its first chunk
    with content (TTFT), and its usage (stream_options.include_usage)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    usage: dict = {}
    with requests.post(
        f"{root}/v1/chat/completions", json=body, stream=True, timeout=600
    ) as response:
        if not response.ok:
            raise RuntimeError(f"{response.status_code} {response.text}")
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):  # per chunk
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(line)
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(content)
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    return {
        "text": "".join(parts),
        "ttft": (first if first is not None else ended) - started,
        "started": started,
        "ended": ended,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        # None: the server did not report it (an engine without the prefix cache)
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
    }


# --- the workloads ---------------------------------------------------------------------------


def multi_turn(root: str, system: str, turns: int, max_tokens: int) -> dict:
    """The conversation: each turn adds the previous answer and a new question."""
    messages = [{"role": "system", "content": system}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": question(turn)})
        result = stream_chat(root, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["text"]})
        rows.append(result)
    ttft = [row["ttft"] for row in rows]
    later = statistics.median(ttft[1:]) if turns > 1 else float("nan")
    return {
        "ttft": ttft,
        "ratio": later / ttft[0],
        "prompt_tokens": [row["prompt_tokens"] for row in rows],
        "cached_tokens": [row["cached_tokens"] for row in rows],
        "answer_tokens": [row["completion_tokens"] for row in rows],
    }


def shared_prompt(root: str, system: str, streams: int, max_tokens: int) -> dict:
    """`streams` concurrent chats with one system prompt and distinct questions."""

    def client(index: int) -> dict:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": question(index)},
        ]
        return stream_chat(root, messages, max_tokens, {"ignore_eos": True})

    results, wall = concurrently(streams, client)
    tokens = sum(r["completion_tokens"] or 0 for r in results)
    assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
    ttft = [r["ttft"] for r in results]
    cached = [r["cached_tokens"] for r in results]
    return {
        "tok_s": tokens / wall,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "cached_tokens": None if None in cached else sum(cached),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
    }


def one_run(cache: str, args: argparse.Namespace, prompts: dict) -> dict:
    """Start a server with the cache `cache` ("off" or "on"), warm it up, measure both
    workloads, stop it."""
    env = {"TURSI_PREFIX_CACHE": "0"} if cache == "off" else {}
    if cache == "on" and args.cache_size:
        env["TURSI_PREFIX_CACHE"] = args.cache_size
    server = Server(args.home, env=env)
    try:
        booted = time.perf_counter()
        server.wait_loaded()
        booted = time.perf_counter() - booted
        warm_up = [{"role": "user", "content": "Say hello to the harbour master."}]
        stream_chat(server.root, warm_up, 8)
        conversation = multi_turn(server.root, prompts["multi_turn"], args.turns, args.max_tokens)
        shared = shared_prompt(server.root, prompts["shared"], args.streams, args.max_tokens)
    finally:
        server.stop()
    return {"cache": cache, "boot_s": booted, "multi_turn": conversation, "shared": shared}


# --- printing --------------------------------------------------------------------------------


def counts(values: list) -> str:
    return " ".join("-" if value is None else str(value) for value in values)


def print_run(index: int, run: dict) -> None:
    talk, shared = run["multi_turn"], run["shared"]
    ttft = " ".join(f"{t:.2f}" for t in talk["ttft"])
    cached = "-" if shared["cached_tokens"] is None else shared["cached_tokens"]
    print(
        f"  run {index} cache {run['cache']:>3} (server up in {run['boot_s']:.0f} s):\n"
        f"    multi-turn TTFT per turn {ttft} s, turns 2+ / turn 1 {talk['ratio']:.2f}x; "
        f"prompt tokens {counts(talk['prompt_tokens'])}; "
        f"cached tokens {counts(talk['cached_tokens'])}\n"
        f"    shared prompt: TTFT p50 {shared['ttft_p50']:.2f} s, p95 "
        f"{shared['ttft_p95']:.2f} s, {shared['tok_s']:.1f} tok/s; cached tokens {cached} "
        f"of {shared['prompt_tokens']}",
        flush=True,
    )


def summary(runs: list[dict]) -> dict:
    """The medians over the runs of one setting."""
    talks = [run["multi_turn"] for run in runs]
    turns = len(talks[0]["ttft"])
    return {
        "ttft_per_turn": [statistics.median(t["ttft"][i] for t in talks) for i in range(turns)],
        "turn_ratio": statistics.median(t["ratio"] for t in talks),
        "shared": median_of(
            [{k: run["shared"][k] for k in ("tok_s", "ttft_p50", "ttft_p95")} for run in runs]
        ),
    }


def print_summary(result: dict) -> None:
    off, on = result["off"], result["on"]
    runs = result["runs"]
    print(f"\nmedians of {runs} run(s) each, off / on:")
    print("| workload | cache off | cache on | on / off | issue 16's target |")
    print("| --- | --- | --- | --- | --- |")
    for turn, (a, b) in enumerate(zip(off["ttft_per_turn"], on["ttft_per_turn"], strict=True)):
        print(f"| multi-turn TTFT turn {turn + 1} (s) | {a:.2f} | {b:.2f} | {b / a:.2f}x | |")
    print(
        f"| multi-turn TTFT turns 2+ / turn 1 | {off['turn_ratio']:.2f}x | "
        f"{on['turn_ratio']:.2f}x | | on <= 0.1x |"
    )
    rows = [("TTFT p50 (s)", "ttft_p50", "<= 0.3x"), ("TTFT p95 (s)", "ttft_p95", "")]
    rows.append(("aggregate tok/s", "tok_s", ">= 1.3x"))
    for label, key, target in rows:
        a, b = off["shared"][key], on["shared"][key]
        print(
            f"| {result['streams']} streams, shared prompt: {label} | {a:.2f} | {b:.2f} | "
            f"{b / a:.2f}x | {target} |"
        )
    if result.get("cached_reported") is False:
        print(
            "\nthe servers reported no usage.prompt_tokens_details.cached_tokens: this engine "
            "has no prefix cache yet, so both settings ran without one"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of one off and one on run")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=1500, help="multi-turn's prompt")
    parser.add_argument("--shared-tokens", type=int, default=1000, help="the shared prompt")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--cache-size", help="TURSI_PREFIX_CACHE of the 'on' runs (default: the server's)"
    )
    parser.add_argument("--home", default=DEFAULT_HOME)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    # The "on" server gets the default unless --cache-size: not a size this shell happens to set.
    os.environ.pop("TURSI_PREFIX_CACHE", None)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(args.home), local_files_only=True)
    multi, multi_count = facts(16, MULTI_TURN_OPENING, args.system_tokens, tokenizer)
    shared, shared_count = facts(61, SHARED_OPENING, args.shared_tokens, tokenizer)
    del tokenizer
    prompts = {"multi_turn": multi, "shared": shared}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}"
        f" python {platform.python_version()}\n"
        f"multi-turn: {args.turns} turns, system prompt {multi_count} tokens, answers <= "
        f"{args.max_tokens} tokens; shared prompt: {args.streams} streams, system prompt "
        f"{shared_count} tokens, {args.max_tokens} tokens each; {args.runs} round(s) of "
        f"off then on, a fresh server per run",
        flush=True,
    )

    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for round_ in range(args.runs):
        for cache in ("off", "on"):
            runs[cache].append(one_run(cache, args, prompts))
            print_run(round_ + 1, runs[cache][-1])

    reported = [
        value
        for run in runs["on"]
        for value in run["multi_turn"]["cached_tokens"] + [run["shared"]["cached_tokens"]]
    ]
    result = {
        "runs": args.runs,
        "turns": args.turns,
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "system_tokens": multi_count,
        "shared_tokens": shared_count,
        "cache_size": args.cache_size,
        "cached_reported": any(value is not None for value in reported),
        "off": summary(runs["off"]),
        "on": summary(runs["on"]),
        "every_run": runs,
    }
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
