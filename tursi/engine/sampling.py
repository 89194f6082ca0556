"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling.

A decode step gives one logits row per running request; `choose_tokens` picks all of them
with one argmax for the greedy rows and one softmax for the sampled rows, then draws each
sampled row with its own settings and random generator.
"""
from __future__ import annotations

from typing import Sequence

import torch

_FIRST_NUCLEUS_GUESS = 64


class TokenChooser:
    """Per-request sampling settings and random state. temperature 0 means greedy (argmax)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature = temperature
        self.top_p = top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick one token id from a 1-D logits vector."""
        return choose_tokens(logits[None], [self])[0]

    def draw(self, probs: torch.Tensor) -> int:
        """Draw from a 1-D probability vector (temperature already applied)."""
        if self.top_p >= 1.0:
            return int(torch.multinomial(probs, 1, generator=self.generator))
        ids, kept = nucleus(probs, self.top_p)
        return int(ids[torch.multinomial(kept, 1, generator=self.generator)])


def choose_tokens(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> list[int]:
    """One token per row of a [rows, vocab] logits batch, row i chosen by choosers[i]."""
    tokens = [0] * len(choosers)
    greedy = [i for i, chooser in enumerate(choosers) if chooser.greedy]
    if greedy:
        best = logits[greedy].float().argmax(-1).tolist()
        for i, token in zip(greedy, best):
            tokens[i] = token
    sampled = [i for i, chooser in enumerate(choosers) if not chooser.greedy]
    if sampled:
        rows = logits[sampled].float()
        temperatures = torch.tensor([choosers[i].temperature for i in sampled])[:, None]
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


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with everything outside the top_p nucleus set to 0, renormalized."""
    ids, kept = nucleus(probs, top_p)
    filtered = torch.zeros_like(probs)
    filtered[ids] = kept
    return filtered / filtered.sum()
