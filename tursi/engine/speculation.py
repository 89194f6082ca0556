"""Speculative decoding's drafts: guesses of each row's next tokens, verified by the model.

A decode step normally gives each running row one token. With speculation, a row whose last
few tokens already occurred earlier in its prompt or output (copying a passage, editing a
document, rewriting code, filling a template) gets the tokens that followed that earlier
occurrence as a draft (n-gram or "prompt lookup" drafting: no draft model; `propose`). The
scheduler runs the row's next token and its draft in one forward pass
(tursi.engine.decode.step_logits) and keeps the draft's tokens for as long as each is the
token the row's sampler chooses at that position, plus the sampler's token where they part:
several tokens for one pass, which costs little more than a one-token pass while a step is
bound by reading the weights.

Exactness: the scheduler chooses every kept token exactly as a step without speculation
would (the same logits processing, grammar, penalties and random generator, position after
position), so greedy output is the same, and sampled output follows the same distribution:
a draft is a point mass, for which the speculative-sampling rule (keep draft token d with
probability p(d), else draw from p without d, renormalized) is the same as drawing from p
and keeping d when the draw is d. A seeded request even draws the same tokens.

Policy (`Speculator`; docs/performance.md "Speculative decoding"): a verify pass of width w
(each row's next token and up to w - 1 drafted ones) costs more than a plain step, by how
much depends on the machine, the load (bf16 on a CPU without bf16 dot products: width 8 ~2.7x
a plain step at one row; 8-bit: ~1.4x) and the rows (at 16 rows every width is compute).
So the scheduler measures it: it times its steps, plain ones per row count and verify ones
per extra column, and each row's drafts are kept at a rate it counts. A step verifies drafts
only when the tokens it expects to keep per unit of measured time beat a plain step's, at
the width where they are best; else it is a plain step. Every REFRESH-th step with drafts
at a row count is plain, so that the plain time stays measured.

A draft model (a smaller catalog model) would be another source of proposals: the speculator
takes each row's (keep rate, drafted tokens) whatever made them, and the verify pass and
the acceptance rule are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
from numpy.lib.stride_tricks import sliding_window_view

MIN_NGRAM = 2  # a draft needs the row's last 2 tokens (at least) to occur earlier
MAX_NGRAM = 4  # the longest suffix looked up
FIRST_EXTRA = 0.3  # a verify column's cost (of a plain step's) before any is measured
SMOOTHING = 0.25  # weight of the newest measurement in the running averages
REFRESH = 32  # steps with drafts between two plain ones at the same row count


@dataclass(frozen=True)
class SpeculationSettings:
    """TURSI_SPECULATIVE (on by default) and TURSI_SPECULATIVE_TOKENS (the most drafted
    tokens per row and step)."""

    enabled: bool = True
    tokens: int = 8


class DraftState:
    """One row's drafting: its tokens so far (prompt and output, looked up by `propose`)
    and how often its drafted tokens were kept."""

    def __init__(self, prompt: list[int], max_tokens: int):
        # The prompt, the output run through the model, then the row's next token.
        self.tokens = numpy.zeros(len(prompt) + max_tokens + 1, dtype=numpy.int64)
        self.tokens[: len(prompt)] = prompt
        self.prompt = len(prompt)
        self.copied = 0  # output tokens copied into `tokens` so far
        self.drafted = 0
        self.accepted = 0
        self.misses = 0  # verified drafts that were cut short (their first rejected token)

    @property
    def keep_rate(self) -> float:
        """The chance that the next drafted token is kept, given the ones before it were:
        kept tokens over kept and rejected ones, starting from 1/2 (Laplace's rule)."""
        return (self.accepted + 1) / (self.accepted + self.misses + 2)

    def draft(self, output: list[int], next_token: int, limit: int) -> list[int]:
        """At most `limit` tokens to follow `next_token`, after the row's `output` (its
        generated tokens run through the model, which only grows)."""
        end = self.prompt + len(output)
        self.tokens[self.prompt + self.copied : end] = output[self.copied :]
        self.copied = len(output)
        self.tokens[end] = next_token
        return propose(self.tokens[: end + 1], limit)

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and its first `accepted` kept."""
        self.drafted += drafted
        self.accepted += accepted
        self.misses += accepted < drafted


def propose(tokens: numpy.ndarray, limit: int) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the longest suffix
    of `tokens` (MAX_NGRAM down to MIN_NGRAM tokens); [] when none occurs."""
    length = len(tokens)
    if limit <= 0:
        return []
    for n in range(min(MAX_NGRAM, length - 1), MIN_NGRAM - 1, -1):
        # windows[i] = tokens[i : i + n] for i + n < length: each has a token after it.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = numpy.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + limit].tolist()
    return []


def expected_tokens(keep_rate: float, drafted: int) -> float:
    """Tokens a row gets from a verify pass with `drafted` drafted tokens: the chosen one,
    plus each drafted one kept with every one before it (1 + p + p^2 + ... + p^drafted)."""
    return sum(keep_rate**i for i in range(drafted + 1))


class Speculator:
    """One scheduler's speculation policy (module docstring): what its steps cost, measured,
    and each step's choice of drafts. Only the scheduler's thread calls it."""

    def __init__(self, settings: SpeculationSettings):
        self.settings = settings
        self.plain: dict[int, float] = {}  # rows -> a plain step's seconds
        self.extra: dict[int, float] = {}  # rows -> a verify column's cost, of a plain step
        self.since_plain: dict[int, int] = {}  # rows -> steps with drafts since a plain one

    def choose(self, proposals: list[tuple[float, list[int]]]) -> list[list[int]]:
        """The drafts this step verifies, from each row's (keep rate, proposed draft): each
        cut to the width where the expected kept tokens per unit of step time are best, or
        none when a plain step's one token per row is better."""
        rows = len(proposals)
        none: list[list[int]] = [[] for _ in proposals]
        longest = max(len(draft) for _, draft in proposals)
        if not longest or rows not in self.plain or self.since_plain.get(rows, 0) >= REFRESH:
            return none
        extra = self.extra.get(rows, FIRST_EXTRA)
        best, best_rate = 1, float(rows)  # a plain step: one token per row, cost 1
        for width in range(2, longest + 2):
            tokens = sum(
                expected_tokens(rate, min(width - 1, len(draft))) for rate, draft in proposals
            )
            rate = tokens / (1 + extra * (width - 1))
            if rate > best_rate:
                best, best_rate = width, rate
        return [draft[: best - 1] for _, draft in proposals]

    def measured(self, rows: int, width: int, seconds: float) -> None:
        """A step of `rows` rows and `width` tokens per row took `seconds`."""
        plain = self.plain.get(rows)
        if width == 1:
            self.plain[rows] = seconds if plain is None else _average(plain, seconds)
            self.since_plain[rows] = 0
            return
        self.since_plain[rows] = self.since_plain.get(rows, 0) + 1
        if plain is not None:
            sample = max(0.0, (seconds / plain - 1) / (width - 1))
            known = self.extra.get(rows)
            self.extra[rows] = sample if known is None else _average(known, sample)


def _average(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
