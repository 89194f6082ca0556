"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling."""
from __future__ import annotations

import torch


class TokenChooser:
    """Per-request sampling state. temperature 0 means greedy (argmax)."""

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

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick one token id from a 1-D logits vector."""
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits.float()
        # Shift by the max first: a tiny temperature then sends the others to -inf, not NaN.
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = top_p_filter(probs, self.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalize."""
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Drop a token when the mass before it already reaches top_p; the most likely one always
    # stays (top_p may round to 0 in float32).
    drop = (cumulative - sorted_probs) >= top_p
    drop[..., 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum()
