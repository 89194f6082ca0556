"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p)
sampling, with an optional repetition penalty.

A decode step gives one logits row per running request; `choose_tokens` picks all of them
with one argmax for the greedy rows and one softmax for the sampled rows, then draws each
sampled row with its own settings and random generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .jobs import SamplingParams

_FIRST_NUCLEUS_GUESS = 64


class TokenChooser:
    """One request's sampling settings (its SamplingParams, taken whole) and random state.
    temperature 0 means greedy (argmax); top_k 0 and top_p 1 mean no cut;
    repetition_penalty 1 means none. `history` is the prompt's token ids."""

    def __init__(self, params: SamplingParams, history: Sequence[int] = ()):
        self.params = params
        # Tokens seen so far (prompt and output), kept only when a penalty applies.
        self.seen: set[int] = set(history) if params.repetition_penalty != 1.0 else set()
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0

    def remember(self, token: int) -> None:
        """Note a generated token (for the repetition penalty)."""
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)

    def penalize(self, logits: torch.Tensor) -> None:
        """Apply the repetition penalty in place to a 1-D float logits vector, as
        transformers does: a seen token's logit is divided by the penalty when positive,
        multiplied when negative."""
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not self.seen:
            return
        ids = torch.tensor(sorted(self.seen), device=logits.device)
        scores = logits[ids]
        logits[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)

    def draw(self, probs: torch.Tensor) -> int:
        """Draw from a 1-D probability vector (temperature already applied), keeping only the
        top_k most likely tokens, then the top_p nucleus of those."""
        top_k, top_p = self.params.top_k, self.params.top_p
        ids = None
        if 0 < top_k < probs.shape[-1]:
            probs, ids = torch.topk(probs, top_k)
            probs = probs / probs.sum()
        if top_p < 1.0:
            kept_ids, probs = nucleus(probs, top_p)
            ids = kept_ids if ids is None else ids[kept_ids]
        choice = int(torch.multinomial(probs, 1, generator=self.generator))
        return choice if ids is None else int(ids[choice])


def choose_tokens(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> list[int]:
    """One token per row of a [rows, vocab] logits batch, row i chosen by choosers[i]."""
    if all(chooser.greedy and not chooser.seen for chooser in choosers):
        # max over the logits as they are: the same index as argmax over a float32 copy
        # (the first of equal maxima), in half the time of that copy and argmax.
        return logits.max(-1).indices.tolist()
    logits = logits.float()
    penalized = [i for i, chooser in enumerate(choosers) if chooser.seen]
    if penalized:
        logits = logits.clone()
        for i in penalized:
            choosers[i].penalize(logits[i])
    tokens = [0] * len(choosers)
    greedy = [i for i, chooser in enumerate(choosers) if chooser.greedy]
    if greedy:
        best = logits[greedy].argmax(-1).tolist()
        for i, token in zip(greedy, best, strict=False):
            tokens[i] = token
    sampled = [i for i, chooser in enumerate(choosers) if not chooser.greedy]
    if sampled:
        # The draws use CPU random generators, so they happen on the CPU.
        rows = logits[sampled].cpu()
        temperatures = torch.tensor(
            [choosers[i].params.temperature for i in sampled], dtype=torch.float32
        )[:, None]
        # Shift by the max first: a tiny temperature then sends the others to -inf, not NaN.
        probs = torch.softmax((rows - rows.max(-1, keepdim=True).values) / temperatures, -1)
        for row, i in enumerate(sampled):
            tokens[i] = choosers[i].draw(probs[row])
    return tokens


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
