"""Choosing the next token from logits, and scoring tokens under the model's distribution.

Each row of a batch is chosen with its own SamplingParams, in this order (transformers' order
for the steps it has, docs/design.md "Sampling"):
1. logit_bias added to the logits;
2. repetition_penalty, transformers' definition, over the prompt and the output;
3. presence and frequency penalties, OpenAI's definition, over the output only:
   logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty;
4. the grammar's mask (structured output): tokens the row's constraint does not allow next
   get -inf (tursi.engine.constraints computes each row's bitmask);
5. temperature, then top_k, top_p and min_p (transformers' warpers, in its order);
6. the choice: argmax for greedy rows, else a draw with the row's own generator.
Steps 1-4 run batched over the rows that use them; a batch of greedy rows that use none of
them is one max over the logits as they are (no mask work unless a row is constrained).

Logprobs (`token_logprobs`, `score`) are of the model's raw distribution, log_softmax of its
logits before any of the above, as vLLM reports by default: a constrained token's logprob is
what the model gave it, not its share of the allowed tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy
import torch

from .constraints import Matcher
from .jobs import SamplingParams, TokenLogprob

_FIRST_NUCLEUS_GUESS = 64
_BLOCK = 512  # tokens per block of best_tokens and top_tokens


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request: seed + choice, wrapped into the int64 range
    (so that n choices differ under one seed, and each is reproducible)."""
    return (seed + choice + 2**63) % 2**64 - 2**63


class TokenChooser:
    """One choice's sampling settings (its request's SamplingParams, taken whole) and state:
    its random generator, the tokens its penalties count and its grammar `matcher`
    (structured output; None: unconstrained). temperature 0 means greedy; top_k 0, top_p 1,
    min_p 0, penalties 0 (1 for repetition) and no logit_bias mean none. `history` is the
    prompt's token ids; `choice` numbers the choices of one request."""

    def __init__(
        self,
        params: SamplingParams,
        history: Sequence[int] = (),
        choice: int = 0,
        matcher: Matcher | None = None,
    ):
        self.params = params
        self.matcher = matcher
        self.repetition = params.repetition_penalty != 1.0
        self.output_penalty = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        # The penalties' state, sparse: a few hundred tokens, not the whole vocabulary (dense
        # [rows, vocab] tensors cost 16 ms a step at 16 rows on 2 cores; these, under 1 ms).
        # seen: the distinct tokens of the prompt and the output (repetition_penalty);
        # counts: how often each token occurs in the output (presence and frequency).
        self.seen: dict[int, None] = dict.fromkeys(history) if self.repetition else {}
        self.counts: dict[int, int] = {}
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(choice_seed(params.seed, choice))

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0

    @property
    def plain(self) -> bool:
        """No logit_bias, no penalty and no grammar: the logits are used as the model gave
        them."""
        return not (
            self.repetition or self.output_penalty or self.params.logit_bias or self.matcher
        )

    @property
    def complete(self) -> bool:
        """The grammar is complete: only end of sequence could follow (never when
        unconstrained)."""
        return self.matcher is not None and self.matcher.complete

    def ends_output(self, token: int) -> bool:
        """`token` is an end of sequence that the grammar allowed: the constrained output
        ends there, even with ignore_eos."""
        return self.matcher is not None and token in self.matcher.eos

    def remember(self, token: int) -> None:
        """Note a generated token: for the penalties, and to advance the grammar (raises
        constraints.GrammarError when the grammar refuses it)."""
        if self.repetition:
            self.seen[token] = None
        if self.output_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        if self.matcher is not None:
            self.matcher.advance(token)

    def candidates(self, probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tokens a draw may pick from a 1-D probability vector (temperature applied):
        (ids, their weights), ids None for the whole vocabulary. top_k keeps the k most
        likely, top_p the nucleus of those (renormalized), min_p those at least min_p times
        as likely as the most likely. The weights need not sum to 1."""
        top_k, top_p, min_p = self.params.top_k, self.params.top_p, self.params.min_p
        ids = None
        if 0 < top_k < probs.shape[-1]:
            probs, ids = torch.topk(probs, top_k)
            probs = probs / probs.sum()
        if top_p < 1.0:
            kept_ids, probs = nucleus(probs, top_p)
            ids = kept_ids if ids is None else ids[kept_ids]
        if min_p > 0.0:
            keep = probs >= min_p * probs.max()
            ids = torch.nonzero(keep).flatten() if ids is None else ids[keep]
            probs = probs[keep]
        return ids, probs

    def draw(self, probs: torch.Tensor) -> int:
        """Draw from a 1-D probability vector (temperature applied), after the cuts of
        `candidates`; with no cut, one multinomial draw over the whole vector, as
        transformers' sampling does."""
        ids, weights = self.candidates(probs)
        choice = int(torch.multinomial(weights, 1, generator=self.generator))
        return choice if ids is None else int(ids[choice])


def choose_tokens(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> list[int]:
    """One token per row of a [rows, vocab] logits batch, row i chosen by choosers[i]."""
    if all(chooser.greedy and chooser.plain for chooser in choosers):
        return best_tokens(logits).tolist()
    logits = adjusted_logits(logits, choosers)
    if any(chooser.matcher is not None for chooser in choosers):
        mask_logits(logits, choosers)
    tokens = [0] * len(choosers)
    greedy = [i for i, chooser in enumerate(choosers) if chooser.greedy]
    if greedy:
        best = best_tokens(logits[greedy]).tolist()
        for i, token in zip(greedy, best, strict=True):
            tokens[i] = token
    sampled = [i for i, chooser in enumerate(choosers) if not chooser.greedy]
    if sampled:
        # The draws use CPU random generators, so they happen on the CPU.
        probs = tempered_probs(logits[sampled].cpu(), [choosers[i] for i in sampled])
        for row, i in enumerate(sampled):
            tokens[i] = choosers[i].draw(probs[row])
    return tokens


def adjusted_logits(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> torch.Tensor:
    """float32 logits after each row's logit_bias, repetition penalty and presence and
    frequency penalties (steps 1-3 of the module docstring), each batched over the (row,
    token) pairs it touches. The caller's tensor is left alone. Every float tensor names
    float32: transformers sets torch's default dtype to a model's while it loads one, and
    the server loads models in a background thread while the others generate."""
    logits = logits.to(torch.float32, copy=True)
    device = logits.device

    def floats(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    def pairs(per_row: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The (rows, tokens) index of the tokens listed per row (row i: per_row[i])."""
        lengths = [len(tokens) for tokens in per_row]
        rows = torch.repeat_interleave(
            torch.arange(len(per_row), device=device),
            torch.tensor(lengths, device=device),
            output_size=sum(lengths),  # known here: no wait on the device to learn it
        )
        return rows, torch.tensor([t for tokens in per_row for t in tokens], device=device)

    biases = [chooser.params.logit_bias for chooser in choosers]
    if any(biases):
        where = pairs([[token for token, _ in bias] for bias in biases])
        values = floats([value for bias in biases for _, value in bias])
        logits.index_put_(where, values, accumulate=True)  # a token may be listed twice
    seen = [chooser.seen for chooser in choosers]
    if any(seen):
        rows, tokens = pairs(seen)
        penalty = floats([chooser.params.repetition_penalty for chooser in choosers])[rows]
        scores = logits[rows, tokens]
        logits[rows, tokens] = torch.where(scores < 0, scores * penalty, scores / penalty)
    counts = [chooser.counts for chooser in choosers]
    if any(counts):
        rows, tokens = pairs(counts)
        frequency = floats([chooser.params.frequency_penalty for chooser in choosers])[rows]
        presence = floats([chooser.params.presence_penalty for chooser in choosers])[rows]
        times = floats([count for row in counts for count in row.values()])
        logits[rows, tokens] -= times * frequency + presence
    return logits


def mask_logits(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> None:
    """Step 4, in place on float32 logits: each constrained row's tokens that its grammar
    does not allow next (ids past the tokenizer's included: the bitmask covers the logits'
    whole width and never allows those) get -1e30 added, which
    leaves them at -1e30: never the argmax, probability exactly 0 after the softmax (-inf
    would do the same, but cannot be added: 0 * inf is NaN).

    The bitmasks are filled on the CPU one row at a time (llguidance, tens of microseconds a
    row), unpacked with numpy (unpackbits: 0.1 ms for 16 rows of a 49k vocabulary) and
    added with one fused multiply-add: masked_fill and where with a bool mask cost 4-5 ms
    there on 2 cores, and llguidance.torch's helper goes through torch.compile (seconds at
    its first call). A row whose matcher has failed or allows nothing is left as it is: the
    token chosen then fails its request in `remember`, instead of a row without any allowed
    token failing the whole batch's draw."""
    rows = [i for i, chooser in enumerate(choosers) if chooser.matcher is not None]
    words = max(choosers[i].matcher.words for i in rows)  # type: ignore[union-attr]
    bits = torch.zeros((len(rows), words), dtype=torch.int32)
    for row, i in enumerate(rows):
        if not choosers[i].matcher.fill(bits[row]):  # type: ignore[union-attr]
            bits[row] = -1
    # bit j of int32 word w is token 32 w + j: the words' bytes in memory order (little
    # endian: x86, ARM), each byte's bits lowest first, list the tokens in order.
    refused = numpy.unpackbits((~bits).numpy().view(numpy.uint8), axis=-1, bitorder="little")
    width = logits.shape[-1]
    # The bitmasks cover the logits: Constraints builds them for the model's logits width.
    refused = torch.from_numpy(refused[:, :width]).to(logits.device).float()
    if len(rows) == len(choosers):
        logits.add_(refused, alpha=-1e30)
    else:
        index = torch.tensor(rows, device=logits.device)
        logits.index_add_(0, index, refused, alpha=-1e30)


def tempered_probs(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> torch.Tensor:
    """softmax(logits / temperature) of each row, with its chooser's temperature."""
    temperatures = _column([chooser.params.temperature for chooser in choosers], logits.device)
    # Shift by the max first: a tiny temperature then sends the others to -inf, not NaN.
    return torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperatures, -1)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], choosers: Sequence[TokenChooser]
) -> list[TokenLogprob | None]:
    """Row i's chosen token scored under the raw logits of row i (with its top
    params.logprobs alternatives), for the rows that ask for logprobs; None for the others."""
    rows = [i for i, chooser in enumerate(choosers) if chooser.params.logprobs is not None]
    entries: list[TokenLogprob | None] = [None] * len(choosers)
    if rows:
        tops = [choosers[i].params.logprobs or 0 for i in rows]
        scored = score(logits[rows], [tokens[i] for i in rows], tops)
        for i, entry in zip(rows, scored, strict=True):
            entries[i] = entry
    return entries


def score(logits: torch.Tensor, ids: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """For each row of [rows, vocab] logits: the log-probability of ids[row] under
    log_softmax(logits[row]) in float32, and the tops[row] most likely tokens, best first."""
    # logit - logsumexp(logits) is log_softmax, without writing out the whole [rows, vocab]
    # result: only the chosen and the top tokens are read (a fifth of a 16-row step's cost).
    logits = logits.float()
    normalizer = torch.logsumexp(logits, -1, keepdim=True)
    index = torch.tensor(list(ids), device=logits.device)[:, None]
    chosen = (logits.gather(-1, index) - normalizer)[:, 0].tolist()
    k = min(max(tops, default=0), logits.shape[-1])
    top_values, top_ids = top_tokens(logits, k) if k else (logits[:, :0], logits[:, :0])
    top_values, top_ids = (top_values - normalizer).tolist(), top_ids.long().tolist()
    return [
        TokenLogprob(
            int(ids[row]),
            chosen[row],
            tuple(zip(top_ids[row][:top], top_values[row][:top], strict=True)),
        )
        for row, top in enumerate(tops)
    ]


def _blocks(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits as [rows, blocks, _BLOCK], the last block padded with -inf."""
    rows, vocab = logits.shape
    count = -(-vocab // _BLOCK)
    if count * _BLOCK != vocab:
        logits = torch.nn.functional.pad(logits, (0, count * _BLOCK - vocab), value=-math.inf)
    return logits.view(rows, count, _BLOCK)


def best_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, the first of equal ones (argmax's answer).

    Two-level: the block holding the row's maximum, then the maximum inside it. torch's
    amax is vectorized where argmax and max-with-indices are not: 0.3 ms instead of 0.9 ms
    for 16 rows of a 49k vocabulary on 2 cores (bf16 or float32)."""
    blocks = _blocks(logits)
    block = blocks.amax(-1).argmax(-1)  # the first block holding the maximum
    inside = blocks[torch.arange(len(blocks), device=logits.device), block].argmax(-1)
    return block * _BLOCK + inside


def top_tokens(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's k largest logits, best first: torch.topk's values.

    The k largest lie in the k blocks with the largest maxima (a block holding one of them
    has a maximum at least the k-th largest value), so topk runs over k blocks, not the
    vocabulary: 0.35 ms instead of 1.3 ms for 16 rows x 49k, k=5. Equal logits may come in
    another order than topk's (whose order among equals is unspecified too)."""
    blocks = _blocks(logits)
    rows, count, _ = blocks.shape
    if k * 4 > count:  # most of the vocabulary: no gain
        return logits.topk(k, -1)
    chosen = blocks.amax(-1).topk(k, -1).indices  # [rows, k]
    candidates = blocks.gather(1, chosen[:, :, None].expand(-1, -1, _BLOCK)).view(rows, -1)
    values, where = candidates.topk(k, -1)
    return values, chosen.gather(1, where // _BLOCK) * _BLOCK + where % _BLOCK


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and probabilities of the smallest set of most likely tokens whose mass
    reaches top_p (the most likely token always stays: top_p may round to 0 in float32).

    Uses partial sorts of 64, 512, ... tokens until the set is complete: a full sort of a
    50k-token vocabulary costs milliseconds, and a nucleus is usually a few dozen tokens.
    """
    size = probs.shape[-1]
    k = min(_FIRST_NUCLEUS_GUESS, size)
    while True:
        values, ids = torch.topk(probs, k)
        # Keep a token while the mass before it is still under top_p.
        keep = (torch.cumsum(values, -1) - values) < top_p
        keep[0] = True
        if not bool(keep[-1]) or k == size:
            return ids[keep], values[keep]
        k = min(k * 8, size)
