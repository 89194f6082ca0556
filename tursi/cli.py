"""The ``tursi`` command: ``tursi serve`` runs gunicorn with the project's settings; the other
commands talk HTTP to a running server (``--url`` / ``TURSI_URL``, ``--api-key`` /
``TURSI_API_KEY``). See docs/cli.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0  # seconds the server may stay silent (streams send heartbeats)
CONNECT_TIMEOUT = 10.0
POLL_FIRST, POLL_GROWTH, POLL_MAX = 0.2, 1.2, 2.0  # load polling: fast at first, then gentler


class CliError(Exception):
    """A failure to report as ``error: <message>`` with exit status 1."""


# --- serve ---------------------------------------------------------------------------------


def _gunicorn_config() -> str:
    """gunicorn.conf.py next to the package in a checkout, else the packaged copy's settings."""
    here = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
    return str(here) if here.is_file() else "python:tursi.api.gunicorn_defaults"


def serve(args: argparse.Namespace) -> int:
    if args.host:
        os.environ["TURSI_HOST"] = args.host
    if args.port:
        os.environ["TURSI_PORT"] = str(args.port)
    if args.workers:
        os.environ["TURSI_WORKERS"] = str(args.workers)
    command = [sys.executable, "-m", "gunicorn", "-c", _gunicorn_config(), "tursi.wsgi:app"]
    os.execv(sys.executable, command)
    return 0  # not reached


# --- HTTP ----------------------------------------------------------------------------------


def base_url(args: argparse.Namespace) -> str:
    return (args.url or os.environ.get("TURSI_URL") or DEFAULT_URL).rstrip("/")


def api(
    args: argparse.Namespace, method: str, path: str, prefix: str = "/api/v1", **kwargs: Any
) -> requests.Response:
    """One request to ``<url><prefix><path>`` (the native API, or ``/v1``: OpenAI's); raises
    CliError for connection failures and for error responses (``<code>: <message>`` from the
    JSON error body, which both APIs shape alike)."""
    key = args.api_key or os.environ.get("TURSI_API_KEY")
    # As UTF-8 bytes, as the server reads keys (http.client would send text as latin-1).
    headers = {"Authorization": f"Bearer {key}".encode()} if key else {}
    url = base_url(args)
    try:
        response = requests.request(
            method,
            f"{url}{prefix}{path}",
            headers=headers,
            timeout=(CONNECT_TIMEOUT, args.timeout),
            **kwargs,
        )
    except requests.ConnectionError as exc:
        raise CliError(
            f"cannot connect to the Tursi server at {url} ({_reason(exc)}); "
            "is `tursi serve` running? (set --url or TURSI_URL)"
        ) from None
    except requests.Timeout:
        raise CliError(f"no answer from {url} within {args.timeout:g}s") from None
    if response.status_code >= 400:
        raise CliError(_error_text(response))
    return response


def _reason(exc: Exception) -> str:
    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "timed out"):
        if known in text:
            return known.lower()
    return type(exc).__name__


def _error_text(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200].strip()}"


def model_entry(args: argparse.Namespace, name: str) -> dict[str, Any]:
    models = api(args, "GET", "/models").json()["models"]
    for entry in models:
        if entry["name"] == name:
            return entry
    raise CliError(f"model_not_found: '{name}' is not in the server's model list")


# --- models, load, unload ------------------------------------------------------------------


def loaded_details(entry: dict[str, Any]) -> str:
    """A loaded model's dtype, device, memory and quantization, as `models` and `load` show
    them."""
    details = [entry.get("dtype"), entry.get("device"), entry.get("memory_usage")]
    if entry.get("quantized"):
        details.append(f"{entry.get('bits')}-bit {entry.get('mode')}")
    return ", ".join(str(d) for d in details if d)


def describe(entry: dict[str, Any]) -> str:
    """The details column of `tursi models` for one entry."""
    status = entry["status"]
    if status == "loaded":
        return ", ".join(p for p in (loaded_details(entry), f"up {entry.get('uptime')}") if p)
    if status == "loading":
        progress = entry.get("progress")
        done = f"{progress * 100:.0f}%" if progress is not None else ""
        return " ".join(p for p in (done, entry.get("stage") or "") if p)
    if status == "failed":
        return entry.get("error") or ""
    return ""


def models(args: argparse.Namespace) -> int:
    body = api(args, "GET", "/models").json()
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [("NAME", "STATUS", "DETAILS")]
    rows += [(m["name"], m["status"], describe(m)) for m in body["models"]]
    print_table(rows)
    return 0


def load_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.quantize or args.bits or args.mode:
        body["quantize"] = True
    if args.bits:
        body["bits"] = args.bits
    if args.mode:
        body["mode"] = args.mode
    if args.dtype:
        body["dtype"] = args.dtype
    return body


def loaded_line(name: str, entry: dict[str, Any], seconds: float) -> str:
    return f"loaded {name} in {seconds:.1f}s ({loaded_details(entry)})"


def load(args: argparse.Namespace) -> int:
    started = time.monotonic()
    answer = api(args, "POST", f"/models/{args.name}/load", json=load_body(args)).json()
    if answer.get("status") == "loaded":
        print(f"{args.name} is already loaded ({describe(model_entry(args, args.name))})")
        return 0
    if args.no_wait:
        estimate = answer.get("estimated_time")
        print(f"loading {args.name}" + (f" (estimated {estimate})" if estimate else ""))
        return 0
    entry = wait_for_load(args, args.name, answer.get("estimated_time"))
    print(loaded_line(args.name, entry, time.monotonic() - started))
    return 0


def wait_for_load(args: argparse.Namespace, name: str, estimate: str | None) -> dict[str, Any]:
    """Poll GET /models with a progress bar (on stderr) until `name` is loaded; return its
    entry. Raises CliError when the load fails."""
    bar = tqdm(
        total=100,
        desc=f"loading {name}",
        unit="%",
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}",
    )
    if estimate:
        bar.set_postfix_str(f"estimated {estimate}")
    try:
        with bar:  # closed before the message below, so that it prints under the bar
            return follow_load(args, name, bar)
    except KeyboardInterrupt:
        print(f"stopped waiting; {name} goes on loading on the server", file=sys.stderr)
        raise


def follow_load(args: argparse.Namespace, name: str, bar: tqdm) -> dict[str, Any]:
    """Move `bar` with the load of `name` until it is loaded; return its entry."""
    interval = POLL_FIRST
    while True:
        try:
            entry = model_entry(args, name)
        except CliError as exc:
            if not str(exc).startswith("rate_limit_exceeded"):
                raise
            time.sleep(5)  # the polls used up the rate limit; wait for the next window
            continue
        if entry["status"] == "loaded":
            bar.n = 100
            bar.set_postfix_str("done")
            return entry
        if entry["status"] == "failed":
            raise CliError(f"load_failed: {name}: {entry.get('error')}")
        if entry["status"] == "not_loaded":
            raise CliError(f"{name} was unloaded before its load was seen to finish")
        if entry.get("stage"):
            bar.set_postfix_str(entry["stage"], refresh=False)
        if entry.get("progress") is not None:  # absent: the bar stays at 0 until loaded
            bar.n = round(entry["progress"] * 100)
        bar.refresh()
        time.sleep(interval)
        interval = min(POLL_MAX, interval * POLL_GROWTH)


def unload(args: argparse.Namespace) -> int:
    api(args, "POST", f"/models/{args.name}/unload")
    print(f"unloaded {args.name}")
    return 0


# --- generate --------------------------------------------------------------------------------


def generate_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.name,
        "prompt": prompt,
        "stream": not args.no_stream,
        "return_full_text": False,
    }
    optional = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
    }
    body.update({k: v for k, v in optional.items() if v is not None})  # else the server's
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def summary(done: dict[str, Any]) -> str:
    return (
        f"[{done.get('tokens_generated')} tokens in {done.get('generation_time')}, "
        f"finish: {done.get('finish_reason')}]"
    )


def generate(args: argparse.Namespace) -> int:
    if args.prompt not in (None, "-"):
        prompt = args.prompt
    elif sys.stdin.isatty():
        raise CliError("no prompt: give PROMPT, or pipe it in on stdin")
    else:
        prompt = sys.stdin.read()
    body = generate_body(args, prompt)
    response = api(args, "POST", "/generate", json=body, stream=body["stream"])
    if not body["stream"]:
        result = response.json()
        print(result["text"])
        print(summary(result), file=sys.stderr)
        return 0
    try:
        for event, data in sse_events(response):
            if event == "text":
                sys.stdout.write(data["text"])
                sys.stdout.flush()
            elif event == "done":
                print()
                print(summary(data), file=sys.stderr)
                return 0
            elif event == "error":
                print()
                error = data.get("error", {})
                raise CliError(f"{error.get('code')}: {error.get('message')}")
    except requests.RequestException as exc:
        raise CliError(f"the stream broke off: {type(exc).__name__}") from None
    finally:
        response.close()
    print()
    raise CliError("the stream ended without a done event")


def sse_events(response: requests.Response):
    """(event, decoded JSON data) per server-sent event; comment lines (heartbeats) skipped."""
    event, data = "message", []
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


# --- status ------------------------------------------------------------------------------------


def _usage(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "none"
    text = f"{memory.get('used')} used of {memory.get('total')} ({memory.get('free')} free)"
    if memory.get("utilization"):
        text += f", {memory['utilization']} busy"
    return text


def status(args: argparse.Namespace) -> int:
    body = api(args, "GET", "/status").json()
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    requests_ = body.get("requests") or {}
    generations = body.get("generations") or {}
    lines = [
        ("server", f"{base_url(args)} ({body.get('status')})"),
        ("uptime", body.get("uptime")),
        ("active models", body.get("active_models")),
        ("memory", _usage(body.get("memory_usage"))),
        ("gpu", _usage(body.get("gpu_usage"))),
        (
            "requests",
            f"{requests_.get('total')} total, {requests_.get('success')} ok, "
            f"{requests_.get('failed')} failed, {requests_.get('rate')}",
        ),
        (
            "generations",
            f"{generations.get('running')} running, {generations.get('waiting')} waiting",
        ),
    ]
    for label, value in lines:
        print(f"{label + ':':<15}{value}")
    return 0


# --- ps ----------------------------------------------------------------------------------------


def ps(args: argparse.Namespace) -> int:
    """The loaded (and loading) models and what each is doing now, like `ollama ps`."""
    models_ = api(args, "GET", "/models").json()["models"]
    listed = [m for m in models_ if m["status"] != "not_loaded"]
    rows = [("NAME", "STATUS", "MEMORY", "PROCESSOR", "RUNNING", "WAITING", "KV CACHE", "UP")]
    for entry in listed:
        if entry["status"] != "loaded":
            rows.append((entry["name"], entry["status"], "", describe(entry), "", "", "", ""))
            continue
        metrics = api(args, "GET", f"/models/{entry['name']}/metrics").json()["metrics"]
        kv = metrics["kv_cache"]
        processor = [entry.get("device"), entry.get("dtype")]
        if entry.get("quantized"):
            processor.append(f"{entry.get('bits')}-bit {entry.get('mode')}")
        kv_text = (
            f"{_mib(kv['reserved_bytes'])} of {_mib(kv['budget_bytes'])}"
            if kv["budget_bytes"]
            else f"{_mib(kv['reserved_bytes'])}, no bound"
        )
        rows.append(
            (
                entry["name"],
                entry["status"],
                entry.get("memory_usage") or "",
                ", ".join(str(p) for p in processor if p),
                str(metrics["generations_running"]),
                str(metrics["generations_waiting"]),
                kv_text,
                entry.get("uptime") or "",
            )
        )
    if len(rows) == 1:
        print("no model is loaded (see `tursi models`)")
        return 0
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of text cells (the header first) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f}MiB"


# --- chat --------------------------------------------------------------------------------------

CHAT_HELP = "/reset clears the history, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer"


def chat(args: argparse.Namespace) -> int:
    """An interactive chat with a loaded model through /v1/chat/completions (the model's chat
    template), the history kept for the session. Ctrl-C during an answer stops it: the
    stream is closed, which cancels the generation on the server, and that turn is dropped
    from the history; the session goes on."""
    model_entry(args, args.name)  # a name the server does not know fails here, not mid-chat
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    first = len(history)
    print(f"chatting with {args.name}; {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print(f"\n({CHAT_HELP})", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/bye"):
            return 0
        if text == "/reset":
            del history[first:]
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        answer = chat_answer(args, history)
        if answer is None:
            history.pop()  # stopped: the turn is not kept
        else:
            history.append({"role": "assistant", "content": answer})


def chat_answer(args: argparse.Namespace, history: list[dict[str, str]]) -> str | None:
    """Stream the model's answer to `history` onto stdout; its text, or None when Ctrl-C
    stopped it."""
    body: dict[str, Any] = {"model": args.name, "messages": history, "stream": True}
    optional = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    response = api(args, "POST", "/chat/completions", prefix="/v1", json=body, stream=True)
    parts: list[str] = []
    try:
        for data in openai_stream(response):
            if "error" in data:
                error = data["error"]
                raise CliError(f"{error.get('code')}: {error.get('message')}")
            for choice in data.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return None
    except requests.RequestException as exc:
        raise CliError(f"the stream broke off: {type(exc).__name__}") from None
    finally:
        response.close()
    print()
    return "".join(parts)


def openai_stream(response: requests.Response):
    """The decoded JSON of each `data:` line of an OpenAI-style stream, until `[DONE]`."""
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


# --- the parser --------------------------------------------------------------------------------

EPILOG = """\
environment:
  TURSI_URL        server URL (default http://127.0.0.1:8000; the API is under /api/v1)
  TURSI_API_KEY    API key, sent as "Authorization: Bearer <key>"

examples:
  tursi serve --port 8000
  tursi load tiny --bits 8
  tursi generate tiny "Once upon a time" --max-tokens 40
  tursi chat smollm2-135m-instruct
  tursi ps
  tursi status

run `tursi COMMAND --help` for a command's flags; see docs/cli.md."""


def client_flags(suppress: bool) -> argparse.ArgumentParser:
    """--url, --api-key and --timeout: on the top-level parser (with defaults) and on each
    client command (without, so `tursi --url X models` and `tursi models --url X` both work)."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("connection options (all commands but serve)")
    group.add_argument(
        "--url",
        default=default(None),
        metavar="URL",
        help=f"server URL, without /api/v1 (env TURSI_URL, default {DEFAULT_URL})",
    )
    group.add_argument(
        "--api-key",
        default=default(None),
        metavar="KEY",
        help="API key sent as a Bearer token (env TURSI_API_KEY)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"give up when the server is silent this long (default {DEFAULT_TIMEOUT:g})",
    )
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tursi",
        description="Tursi model server: run it, or manage and query a running one.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[client_flags(suppress=False)],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = [client_flags(suppress=True)]

    serve_parser = commands.add_parser(
        "serve", help="run the server under gunicorn (gevent worker); settings from TURSI_* env"
    )
    serve_parser.add_argument("--host", help="bind address (TURSI_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (TURSI_PORT, default 8000)")
    serve_parser.add_argument(
        "--workers", type=int, help="gunicorn workers (TURSI_WORKERS, default 1)"
    )
    serve_parser.set_defaults(func=serve)

    models_parser = commands.add_parser(
        "models",
        parents=client,
        help="list the catalog's models and their status",
        description="List the server's models: name, status and details (dtype, device, "
        "memory and uptime when loaded; progress while loading; the error if failed).",
    )
    models_parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    models_parser.set_defaults(func=models)

    load_parser = commands.add_parser(
        "load",
        parents=client,
        help="load a model, with a progress bar until it is ready",
        description="Start loading a model and show its progress until it is loaded "
        "(exit 0) or failed (exit 1). Ctrl-C stops waiting, not the load.",
    )
    load_parser.add_argument("name", help="model name (see `tursi models`)")
    load_parser.add_argument(
        "--quantize",
        action="store_true",
        help="load quantized (8-bit dynamic unless --bits/--mode say otherwise)",
    )
    load_parser.add_argument(
        "--bits", type=int, choices=(4, 8), help="quantization bits (implies --quantize)"
    )
    load_parser.add_argument(
        "--mode",
        choices=("dynamic", "static"),
        help="activation scales (implies --quantize; default dynamic)",
    )
    load_parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights / compute dtype (default: the catalog's, else auto)",
    )
    load_parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the server accepted the load, without waiting",
    )
    load_parser.set_defaults(func=load)

    unload_parser = commands.add_parser(
        "unload",
        parents=client,
        help="unload a model and free its memory",
        description="Unload a loaded model; its running generations end with model_unloaded.",
    )
    unload_parser.add_argument("name", help="model name")
    unload_parser.set_defaults(func=unload)

    gen = commands.add_parser(
        "generate",
        parents=client,
        help="generate text from a prompt, streamed to the terminal",
        description="Generate a continuation of PROMPT with a loaded model. The text goes to "
        "stdout as it is produced; a summary (tokens, time, finish reason) to "
        "stderr. Unset sampling flags take the server's defaults.",
    )
    gen.add_argument("name", help="a loaded model's name")
    gen.add_argument("prompt", nargs="?", help="the prompt; '-' or none: read it from stdin")
    gen.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate")
    gen.add_argument(
        "--temperature", type=float, metavar="T", help="0..2, 0 = greedy (server default 0.7)"
    )
    gen.add_argument(
        "--top-p", type=float, metavar="P", help="nucleus sampling, (0, 1] (server default 0.9)"
    )
    gen.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        help="penalize tokens already seen (1 = none)",
    )
    gen.add_argument("--seed", type=int, help="make sampling reproducible")
    gen.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)"
    )
    gen.add_argument(
        "--ignore-eos",
        action="store_true",
        help="go on past end-of-sequence until --max-tokens or a stop string",
    )
    gen.add_argument(
        "--no-stream", action="store_true", help="one request, print the text when it is complete"
    )
    gen.set_defaults(func=generate)

    status_parser = commands.add_parser(
        "status",
        parents=client,
        help="show the server's health, memory and request counts",
        description="Show the server's status: uptime, loaded models, memory, GPU, request "
        "counts and running generations.",
    )
    status_parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    status_parser.set_defaults(func=status)

    ps_parser = commands.add_parser(
        "ps",
        parents=client,
        help="show the loaded models and what each is running",
        description="One row per loaded (or loading) model: memory, device and dtype, "
        "running and waiting generations, KV cache reserved of its budget, uptime.",
    )
    ps_parser.set_defaults(func=ps)

    chat_parser = commands.add_parser(
        "chat",
        parents=client,
        help="chat with a loaded model in the terminal",
        description="An interactive chat through /v1/chat/completions, streamed; the history "
        f"is kept for the session. {CHAT_HELP}.",
    )
    chat_parser.add_argument("name", help="a loaded model's name")
    chat_parser.add_argument("--system", metavar="TEXT", help="a system message to begin with")
    chat_parser.add_argument("--max-tokens", type=int, metavar="N", help="most tokens an answer")
    chat_parser.add_argument("--temperature", type=float, metavar="T", help="0..2, 0 = greedy")
    chat_parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, (0, 1]")
    chat_parser.add_argument("--seed", type=int, help="make sampling reproducible")
    chat_parser.set_defaults(func=chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `tursi generate ... | head`: stay quiet at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
