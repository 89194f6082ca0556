"""lm-evaluation-harness against a real Tursi server, checked against the model's own logits.

    make lm-eval            # installs lm_eval 0.4.13 into .venv-lmeval, then runs this
    .venv-lmeval/bin/python bench/lm_eval_check.py [--batch-size 4] [--home DIR]

lm-eval's `local-completions` model scores multiple-choice tasks through /v1/completions: for
each (context, choice) pair it sends the token ids of context + continuation as the prompt
with `echo: true, logprobs: 1, max_tokens: 1, temperature: 0`, several pairs per request
(`prompt` as a list of token-id lists, --batch-size of them), and sums the echoed prompt
logprobs of the continuation's tokens. This script:

1. computes the task's answers in-process: the embedded model as transformers loads it from
   the same converted files, in float32, one forward pass per pair, the choice with the
   largest sum of continuation-token logprobs (an outside reference: no Tursi code runs);
2. starts a real gunicorn server (bench/serving.py's Server) and loads the embedded model in
   float32 (POST /api/v1/models/{name}/load {"dtype": "float32"}: on a CPU with bf16 the
   default would be bf16, whose logprobs differ from the reference);
3. runs lm-eval's simple_evaluate on the task in bench/mc_task/ (a YAML and a JSONL read from
   disk; HF_*_OFFLINE are set, so nothing is downloaded) against that server;
4. checks that the two accuracies are equal, that every question got the same answer, and
   that every choice's loglikelihood agrees to --tolerance. Exits 1 otherwise.

lm-eval is not in requirements.txt (it pulls in datasets, pandas, scikit-learn and more): the
Makefile's lm-eval target installs it in a separate venv that sees .venv's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from serving import MODEL, ROOT, Server  # bench/ is this script's folder, first on sys.path

TASK_DIR = ROOT / "bench" / "mc_task"
TASK = "tursi_mc"

# The server's fp32 steps (packed CPU matmuls, batched rows) are not bit-identical to
# transformers' forward pass; a continuation's sum of 1-5 token logprobs stays well inside this.
TOLERANCE = 1e-3


def task_pairs() -> list[tuple[dict, str, list[str]]]:
    """(doc, context, continuations) per question, rendered from the task's own YAML (its
    doc_to_text template and target_delimiter), so both sides score the same strings."""
    import jinja2
    import yaml

    config = yaml.safe_load((TASK_DIR / f"{TASK}.yaml").read_text())
    template = jinja2.Template(config["doc_to_text"])
    delimiter = config.get("target_delimiter", " ")
    data = ROOT / config["dataset_kwargs"]["data_files"]["test"]
    docs = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    return [
        (doc, template.render(**doc), [delimiter + choice for choice in doc["choices"]])
        for doc in docs
    ]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """How a causal LM's pair is tokenized for scoring (lm-eval's convention, which the
    reference must share for the token sequences to be the same): the context's trailing
    spaces move to the continuation; the whole string is encoded, and the continuation is
    the tokens past the context's own encoding. No special tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def reference(source: str, pairs: list[tuple[dict, str, list[str]]]) -> list[list[float]]:
    """Per question, per choice: the sum of the continuation tokens' log-softmax under the
    model as transformers loads it in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for _, context, continuations in pairs:
            row = []
            for continuation in continuations:
                context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
                ids = context_ids + continuation_ids
                logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                row.append(
                    sum(
                        logprobs[position - 1, ids[position]].item()
                        for position in range(len(context_ids), len(ids))
                    )
                )
            scores.append(row)
    return scores


def run_lm_eval(
    completions_url: str, tokenizer_dir: str, batch_size: int
) -> tuple[dict, dict, list[str]]:
    """simple_evaluate with local-completions on the task; returns the results, the first
    request body lm-eval sent (recorded to show what the server has to accept) and the
    answers that break lm-eval's reading of them (short_answers)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    sent: dict = {}
    broken: list[str] = []
    create_payload = LocalCompletionsAPI._create_payload
    parse_logprobs = LocalCompletionsAPI.parse_logprobs

    def recording(self, *args, **kwargs):
        payload = create_payload(self, *args, **kwargs)
        sent.setdefault("payload", payload)
        return payload

    def checking(outputs, tokens=None, ctxlens=None, **kwargs):
        broken.extend(short_answers(outputs, tokens))
        return parse_logprobs(outputs, tokens=tokens, ctxlens=ctxlens, **kwargs)

    LocalCompletionsAPI._create_payload = recording
    LocalCompletionsAPI.parse_logprobs = staticmethod(checking)
    try:
        results = simple_evaluate(
            model="local-completions",
            model_args={
                "model": MODEL,
                "base_url": completions_url,
                # The server has no /tokenizer_info, so lm-eval would fall back to a Hugging
                # Face tokenizer anyway; this one is the model's own, from the converted files.
                "tokenizer_backend": "huggingface",
                "tokenizer": tokenizer_dir,
                "batch_size": batch_size,
                "max_retries": 1,
            },
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(TASK_DIR)),
            log_samples=True,
            bootstrap_iters=0,
        )
    finally:
        LocalCompletionsAPI._create_payload = create_payload
        LocalCompletionsAPI.parse_logprobs = staticmethod(parse_logprobs)
    return results, sent["payload"], broken


def short_answers(outputs: dict | list[dict], prompts: list[list[int]]) -> list[str]:
    """lm-eval reads token_logprobs[ctxlen:-1]: it takes the last entry for the one generated
    token (max_tokens 1) and drops it. A choice whose logprobs do not hold exactly the
    prompt's tokens + 1 (e.g. an end-of-sequence token left out) loses a continuation token
    instead: each such choice, described."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    choices = sorted(
        (choice for out in outputs for choice in out["choices"]), key=lambda c: c["index"]
    )
    return [
        f"choice {choice['index']}: {len(choice['logprobs']['token_logprobs'])} token_logprobs "
        f"for a {len(prompt)}-token prompt + 1 (finish_reason {choice.get('finish_reason')!r})"
        for choice, prompt in zip(choices, prompts, strict=True)
        if len(choice["logprobs"]["token_logprobs"]) != len(prompt) + 1
    ]


def served_scores(results: dict, pairs: list[tuple[dict, str, list[str]]]) -> list[list[float]]:
    """Per question (by doc_id), per choice: the loglikelihood lm-eval got from the server,
    after checking that lm-eval scored the same (context, continuation) strings."""
    scores: list[list[float] | None] = [None] * len(pairs)
    for sample in results["samples"][TASK]:
        _, context, continuations = pairs[sample["doc_id"]]
        asked = [tuple(arguments[:2]) for arguments in sample["arguments"]]
        assert asked == [(context, c) for c in continuations], (asked, context, continuations)
        scores[sample["doc_id"]] = [float(resp[0]) for resp in sample["filtered_resps"]]
    assert all(row is not None for row in scores), "lm-eval skipped questions"
    return scores  # type: ignore[return-value]


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def compare(pairs, expected: list[list[float]], served: list[list[float]], tolerance: float):
    """Accuracy both ways, the questions whose chosen answer differs, the largest gap."""
    gold = [doc["answer"] for doc, _, _ in pairs]
    accuracy = {
        name: sum(argmax(row) == answer for row, answer in zip(rows, gold, strict=True)) / len(gold)
        for name, rows in (("reference", expected), ("server", served))
    }
    differing = [
        index
        for index, (a, b) in enumerate(zip(expected, served, strict=True))
        if argmax(a) != argmax(b)
    ]
    gap = max(
        abs(a - b)
        for row_a, row_b in zip(expected, served, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    return accuracy, differing, gap, gap <= tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per request")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument(
        "--home",
        default=os.environ.get(
            "TURSI_HOME", os.path.join(os.path.expanduser("~"), ".cache", "tursi")
        ),
    )
    args = parser.parse_args()
    os.chdir(ROOT)  # the task's data_files path is relative to the repository root
    cache = tempfile.TemporaryDirectory(prefix="lm-eval-datasets-")
    os.environ.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=cache.name,  # the task's data is parsed afresh, never a stale copy
        TOKENIZERS_PARALLELISM="false",
    )

    from tursi.engine.catalog import Catalog
    from tursi.engine.loading import locate

    # The embedded GGUF converted to safetensors + tokenizer files (once, under --home); the
    # server loads the same directory.
    source = locate(Catalog.load(None).get(MODEL), args.home, False)
    pairs = task_pairs()
    started = time.perf_counter()
    expected = reference(source, pairs)
    print(f"reference: {len(pairs)} questions in {time.perf_counter() - started:.1f} s", flush=True)

    server = Server(args.home, preload="")
    try:
        server.load({"dtype": "float32"})
        started = time.perf_counter()
        results, payload, broken = run_lm_eval(
            f"http://127.0.0.1:{server.port}/v1/completions", source, args.batch_size
        )
        print(f"lm-eval: {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        server.stop()

    served = served_scores(results, pairs)
    accuracy, differing, gap, close = compare(pairs, expected, served, args.tolerance)
    shown = {**payload, "prompt": [f"[{len(p)} token ids]" for p in payload["prompt"]]}
    print(f"request lm-eval sends (first one): {json.dumps(shown)}")
    print(f"lm-eval's own acc: {results['results'][TASK]['acc,none']:.4f}")
    print(
        f"accuracy: server (via lm-eval) {accuracy['server']:.4f}, "
        f"in-process reference {accuracy['reference']:.4f}"
    )
    print(f"largest loglikelihood difference: {gap:.2e} (tolerance {args.tolerance:.0e})")
    if broken:
        print(f"{len(broken)} answers lm-eval misreads (it needs prompt + 1 entries):")
        for line in broken[:5]:
            print(f"  {line}")
    ok = accuracy["server"] == accuracy["reference"] and not differing and close and not broken
    ok = ok and results["results"][TASK]["acc,none"] == accuracy["server"]
    if differing:
        print(f"questions answered differently: {differing}")
    far = [
        (abs(a - b), question, choice, a, b)
        for question, (row_a, row_b) in enumerate(zip(expected, served, strict=True))
        for choice, (a, b) in enumerate(zip(row_a, row_b, strict=True))
        if abs(a - b) > args.tolerance
    ]
    for _, question, choice, a, b in sorted(far, reverse=True)[:10]:
        print(f"  question {question} choice {choice}: reference {a:.5f}, server {b:.5f}")
    if far:
        print(f"  ({len(far)} of {sum(map(len, expected))} choices past the tolerance)")
    print("OK: lm-eval through the server agrees with the model's logits" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
