"""Speculative decoding's drafts: guesses of each row's next tokens, verified by the model.

A decode step normally gives each running row one token. With speculation, a row whose last
few tokens already occurred earlier in its prompt or output (copying a passage, editing a
document, rewriting code, filling a template) gets the tokens that followed that earlier
occurrence as a draft (n-gram or "prompt lookup" drafting: no draft model). The scheduler
runs the row's next token and its draft in one forward pass (tursi.engine.decode.step_logits)
and keeps the draft's tokens for as long as each is the token the row's sampler chooses at
that position, plus the sampler's token where they part: several tokens for one pass that
costs about what a one-token pass does while a step is bound by reading the weights.

Exactness: the scheduler chooses every kept token exactly as a step without speculation
would (the same logits processing, grammar, penalties and random generator, position after
position), so greedy output is the same, and sampled output follows the same distribution:
a draft is a point mass, for which the speculative-sampling rule (keep draft token d with
probability p(d), else draw from p without d, renormalized) is the same as drawing from p
and keeping d when the draw is d. A seeded request even draws the same tokens.

Policy (docs/performance.md "Speculative decoding", measured there):
- a row drafts only when a match of at least MIN_NGRAM tokens exists (the longest of up to
  MAX_NGRAM, the latest occurrence); at most `SpeculationSettings.tokens` drafts, fewer
  when its max_tokens or the context ends sooner;
- a row whose draft was wholly rejected waits before drafting again, twice as long after
  each such miss (up to MAX_COOLDOWN steps): free text rarely repeats, and each rejected
  draft token costs a step a token of compute;
- a step verifies drafts only while its rows times its width (1 + the longest draft) stay
  within `SpeculationSettings.step_tokens`: past a few rows a step is bound by compute, not
  by reading the weights, and verifying rejected guesses then slows every row.
The drafter is one class with `propose`, so that a draft model could later stand beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
from numpy.lib.stride_tricks import sliding_window_view

MIN_NGRAM = 2  # a draft needs the row's last 2 tokens (at least) to occur earlier
MAX_NGRAM = 4  # the longest suffix looked up
MAX_COOLDOWN = 16  # steps a row waits at most after a rejected draft


@dataclass(frozen=True)
class SpeculationSettings:
    """TURSI_SPECULATIVE (on by default) and TURSI_SPECULATIVE_TOKENS (drafts per row and
    step); step_tokens: the most tokens (rows x width) a step with drafts may run."""

    enabled: bool = True
    tokens: int = 8
    step_tokens: int = 16


class DraftState:
    """One row's drafting: its tokens so far (prompt and output, looked up by `propose`),
    what it drafted and kept, and its cooldown."""

    def __init__(self, prompt: list[int], max_tokens: int):
        # The prompt, the output run through the model, then the row's next token.
        self.tokens = numpy.zeros(len(prompt) + max_tokens + 1, dtype=numpy.int64)
        self.tokens[: len(prompt)] = prompt
        self.prompt = len(prompt)
        self.copied = 0  # output tokens copied into `tokens` so far
        self.drafted = 0
        self.accepted = 0
        self.wait = 0  # steps left before the row drafts again
        self.cooldown = 1  # the wait after the next wholly rejected draft

    def draft(self, output: list[int], next_token: int, limit: int) -> list[int]:
        """At most `limit` tokens to follow `next_token`, after the row's `output` (its
        generated tokens run through the model, which only grows); [] while it cools down."""
        if self.wait:
            self.wait -= 1
            return []
        end = self.prompt + len(output)
        self.tokens[self.prompt + self.copied : end] = output[self.copied :]
        self.copied = len(output)
        self.tokens[end] = next_token
        return propose(self.tokens[: end + 1], limit)

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of `drafted` tokens was verified and `accepted` of them kept: a wholly
        rejected one starts (or doubles) the row's cooldown, any kept token ends it."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted:
            self.cooldown = 1
        else:
            self.wait = self.cooldown
            self.cooldown = min(2 * self.cooldown, MAX_COOLDOWN)


def step_width(settings: SpeculationSettings, rows: int) -> int:
    """The widest step (1 + drafts per row) that `rows` rows may run: 1 (no drafts) when
    speculation is off or the step would pass settings.step_tokens with a single draft."""
    if not settings.enabled:
        return 1
    return max(1, min(settings.tokens + 1, settings.step_tokens // rows))


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
