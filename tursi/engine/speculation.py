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
per extra column, and each row's drafted tokens are kept at a rate it counts (a new row
starts from the model's rate so far). A step verifies drafts only when the tokens it expects
to keep per unit of measured time beat a plain step's by MARGIN, at the width where they
are best; else it is a plain step. (At 16 rows on this CPU a verify column costs ~0.4 of a
plain step: only rows that are nearly all copying pass that.) Every REFRESH-th step with drafts
at a row count is plain, so that the plain time stays measured.

A draft model (a smaller catalog model) would be another source of proposals: the speculator
takes each row's (keep rate, drafted tokens) whatever made them, and the verify pass and
the acceptance rule are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_NGRAM = 2  # a draft needs the row's last 2 tokens (at least) to occur earlier
MAX_NGRAM = 4  # the longest suffix looked up
FIRST_EXTRA = 0.3  # a verify column's cost (of a plain step's) before any is measured
SMOOTHING = 0.25  # weight of the newest measurement in the running averages
REFRESH = 32  # steps with drafts between two plain ones at the same row count
MARGIN = 1.1  # a verify step must promise this much more than a plain one
PRIOR_WEIGHT = 2  # a row's keep rate starts as this many drafted tokens at the model's rate


@dataclass(frozen=True)
class SpeculationSettings:
    """TURSI_SPECULATIVE (on by default) and TURSI_SPECULATIVE_TOKENS (the most drafted
    tokens per row and step)."""

    enabled: bool = True
    tokens: int = 8


class NgramIndex:
    """A sequence of tokens that only grows, and where each of its n-grams (MIN_NGRAM to
    MAX_NGRAM tokens) last occurred with a token after it: `propose` is a few dictionary
    lookups, not a scan of the sequence (a scan cost ~60 us a row per step, a few percent
    of a 16-row step)."""

    def __init__(self, tokens: list[int] = ()):
        self.tokens: list[int] = []
        # n -> {n tokens: the latest start i with tokens[i:i + n] equal, and i + n < len}
        self.latest: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(MIN_NGRAM, MAX_NGRAM + 1)
        }
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the n-grams ending before `token` now have a follower
            for n, latest in self.latest.items():
                if end >= n:
                    latest[tuple(self.tokens[end - n : end])] = end - n

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest
        suffix of the sequence (MAX_NGRAM down to MIN_NGRAM tokens); [] when none occurs."""
        if limit <= 0:
            return []
        length = len(self.tokens)
        for n in range(min(MAX_NGRAM, length - 1), MIN_NGRAM - 1, -1):
            start = self.latest[n].get(tuple(self.tokens[length - n :]))
            if start is not None:
                return self.tokens[start + n : start + n + limit]
        return []


class DraftState:
    """One row's drafting: its tokens so far (prompt and output, in an NgramIndex) and how
    often its drafted tokens were kept."""

    def __init__(self, prompt: list[int]):
        self.index = NgramIndex(prompt)
        self.prompt = len(prompt)
        self.drafted = 0
        self.accepted = 0
        self.misses = 0  # verified drafts that were cut short (their first rejected token)

    def keep_rate(self, prior: float) -> float:
        """The chance that the next drafted token is kept, given the ones before it were:
        kept tokens over kept and rejected ones, starting from `prior` (the model's rate,
        Speculator.keep_rate) as PRIOR_WEIGHT tokens' worth."""
        kept = self.accepted + PRIOR_WEIGHT * prior
        return kept / (self.accepted + self.misses + PRIOR_WEIGHT)

    def draft(self, output: list[int], next_token: int, limit: int) -> list[int]:
        """At most `limit` tokens to follow `next_token`, after the row's `output` (its
        generated tokens run through the model, which only grows, and becomes output +
        [next_token] and more by the next call)."""
        placed = len(self.index.tokens) - self.prompt  # the last call's output + next token
        self.index.extend([*output[placed:], next_token])
        return self.index.propose(limit)

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and its first `accepted` kept."""
        self.drafted += drafted
        self.accepted += accepted
        self.misses += accepted < drafted


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
        self.accepted = 0  # over every row, as DraftState counts them
        self.misses = 0

    @property
    def keep_rate(self) -> float:
        """The model's rate of kept drafted tokens (DraftState.keep_rate) over every row so
        far, starting from 1/2 (Laplace's rule): a new row's prior."""
        return (self.accepted + 1) / (self.accepted + self.misses + 2)

    def verified(self, drafted: int, accepted: int) -> None:
        """A row's draft of `drafted` tokens was verified and its first `accepted` kept."""
        self.accepted += accepted
        self.misses += accepted < drafted

    def choose(self, proposals: list[tuple[float, list[int]]]) -> list[list[int]]:
        """The drafts this step verifies, from each row's (keep rate, proposed draft): each
        cut to the width where the expected kept tokens per unit of step time are best, or
        none unless that beats a plain step's one token per row by MARGIN (the estimates
        are noisy, and proposing costs a little too)."""
        rows = len(proposals)
        none: list[list[int]] = [[] for _ in proposals]
        longest = max(len(draft) for _, draft in proposals)
        if not longest or rows not in self.plain or self.since_plain.get(rows, 0) >= REFRESH:
            return none
        extra = self._extra(rows)
        drafting = [(rate, len(draft)) for rate, draft in proposals if draft]
        plain = rows - len(drafting)  # rows without a draft: one token at any width
        best, best_rate = 1, rows * MARGIN  # a plain step: one token per row, cost 1
        for width in range(2, longest + 2):
            tokens = plain + sum(
                expected_tokens(rate, min(width - 1, length)) for rate, length in drafting
            )
            rate = tokens / (1 + extra * (width - 1))
            if rate > best_rate:
                best, best_rate = width, rate
        return [draft[: best - 1] for _, draft in proposals]

    def _extra(self, rows: int) -> float:
        """A verify column's cost at `rows` rows: measured there, else where measured at
        the nearest row count (more rows first: a column costs more with more rows), else
        FIRST_EXTRA."""
        if rows in self.extra:
            return self.extra[rows]
        if not self.extra:
            return FIRST_EXTRA
        nearest = min(self.extra, key=lambda known: (abs(known - rows), -known))
        return self.extra[nearest]

    def measured(self, rows: int, width: int, seconds: float) -> None:
        """A step of `rows` rows and `width` tokens per row took `seconds`."""
        plain = self.plain.get(rows)
        if width == 1:
            self.plain[rows] = seconds if plain is None else _average(plain, seconds)
            self.since_plain[rows] = 0
            return
        self.since_plain[rows] = self.since_plain.get(rows, 0) + 1
        if plain:  # (a clock that did not move measures nothing)
            sample = max(0.0, (seconds / plain - 1) / (width - 1))
            known = self.extra.get(rows)
            self.extra[rows] = sample if known is None else _average(known, sample)


def _average(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new
