"""Token budgets: an optional per-client limit on the tokens its generations spend per window
(TURSI_TOKEN_RATE_LIMIT, "100000/minute"), prompt plus generated tokens as hosted APIs count
them, beside the request limit (tursi.api.limits): the same client key (a digest of the API
key, else the address) and the same storage (TURSI_RATELIMIT_STORAGE_URI: Redis shares one
budget between workers and hosts), with the `limits` library's fixed-window counter.

What is charged, when:
- Admission (after tokenizing, before the job is queued): the request needs its prompt
  tokens plus the most it may generate (max_tokens for each choice, best_of's included).
  If the budget left in the window covers that, it is reserved at once; else 429
  token_rate_limit_exceeded and nothing is charged. A request that needs more than a whole
  window's budget can never pass: 429 request_exceeds_token_limit, not retried. Reserving
  the most first means a client never spends more than its budget, however many requests
  it runs at once and on whichever workers.
- End (answer sent, stream over, client gone, error): the reservation is settled to the
  cost: the prompt tokens plus the tokens the engine generated; what was reserved and not
  generated goes back to the window it was taken from. A request the queue refused (503)
  costs nothing.

The windows are fixed and aligned to the clock (a minute's budget refills at every whole
minute), and the storage key names its window: a settlement that comes after the window
turned gives back to the old window, never to the new one."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flask import Flask, Response, current_app, request
from limits import RateLimitItem, parse
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from ..engine.jobs import GenerationJob
from ..errors import RequestOverTokenLimit, TokenRateLimitExceeded
from .auth import is_api_path
from .limits import rate_limit_key

log = logging.getLogger(__name__)

HEADERS = ("X-RateLimit-Limit-Tokens", "X-RateLimit-Remaining-Tokens", "X-RateLimit-Reset-Tokens")
_EXTENSION = "tursi.token_budget"


class TokenBudget:
    """One limit (`item`) per client, counted in `storage`."""

    def __init__(self, item: RateLimitItem, storage: Storage):
        self.item, self.storage = item, storage
        self.counter = FixedWindowRateLimiter(storage)
        self.seconds = item.get_expiry()

    def reserve(self, client: str, prompt_tokens: int, most_generated: int) -> Reservation:
        """Take prompt_tokens + most_generated from the client's window, or raise a 429."""
        cost = prompt_tokens + most_generated
        numbers = {
            "limit": str(self.item),
            "requested_tokens": cost,
            "prompt_tokens": prompt_tokens,
            "max_generated_tokens": most_generated,
        }
        if cost > self.item.amount:
            raise RequestOverTokenLimit(
                f"The request needs up to {cost} tokens ({prompt_tokens} prompt + "
                f"{most_generated} to generate), more than the token limit of {self.item} "
                "allows at all: shorten the prompt or lower max_tokens (or n)",
                numbers,
            )
        window = self._window(time.time())
        ids = ("tokens", client, str(window))
        # test() first, so a refusal never touches the counter; hit() counts even when it
        # goes over (a request on another worker took the room meanwhile), then give back.
        if not self.counter.test(self.item, *ids, cost=cost) or not self._take(ids, cost):
            wait = max(1, math.ceil((window + 1) * self.seconds - time.time()))
            raise TokenRateLimitExceeded(
                f"Token rate limit exceeded: the request needs up to {cost} tokens and "
                f"{self.remaining(client)} of {self.item} are left; retry in {wait} s",
                numbers,
                headers={"Retry-After": str(wait)},
            )
        return Reservation(self, ids, cost, prompt_tokens)

    def _take(self, ids: tuple[str, ...], cost: int) -> bool:
        if self.counter.hit(self.item, *ids, cost=cost):
            return True
        self.give_back(ids, cost)
        return False

    def give_back(self, ids: tuple[str, ...], tokens: int) -> None:
        if tokens > 0:
            self.storage.incr(self.item.key_for(*ids), self.seconds, amount=-tokens)

    def _window(self, now: float) -> int:
        return int(now // self.seconds)

    def remaining(self, client: str) -> int:
        return self.stats(client)[1]

    def stats(self, client: str) -> tuple[int, int, int]:
        """(limit, tokens left, when the window refills: Unix seconds) for `client`."""
        window = self._window(time.time())
        used = self.storage.get(self.item.key_for("tokens", client, str(window)))
        return self.item.amount, max(0, self.item.amount - used), (window + 1) * self.seconds


@dataclass
class Reservation:
    """What one request reserved; settled once, when the request ends."""

    budget: TokenBudget
    ids: tuple[str, ...]
    reserved: int
    prompt_tokens: int
    settled: bool = False

    def settle(self, generated: int | None) -> None:
        """Charge the prompt plus `generated` tokens and give the rest back; None: nothing
        ran (the queue refused the request), so everything goes back."""
        if self.settled:
            return
        self.settled = True
        cost = 0 if generated is None else self.prompt_tokens + generated
        try:
            self.budget.give_back(self.ids, self.reserved - cost)
        except Exception:  # the storage is down: the reservation stays charged
            log.warning("could not give back unused tokens to the token budget", exc_info=True)


def reserve(jobs: Sequence[GenerationJob]) -> Reservation | None:
    """Reserve the tokens of a request's jobs (tokenized, not yet queued) in the calling
    client's budget; None when no token limit is set."""
    budget: TokenBudget | None = current_app.extensions.get(_EXTENSION)
    if budget is None:
        return None
    prompt = sum(len(job.prompt_ids) for job in jobs)
    most = sum(job.params.max_tokens * job.n for job in jobs)
    return budget.reserve(rate_limit_key(), prompt, most)


def _headers(response: Response) -> Response:
    """The client's token budget on every API response (after a stream's reservation, before
    its settlement; after a whole answer's settlement)."""
    if not is_api_path(request.path):
        return response
    budget: TokenBudget = current_app.extensions[_EXTENSION]
    try:
        values = budget.stats(rate_limit_key())
    except Exception:  # informative only: a storage hiccup does not fail the answer
        log.warning("could not read the token budget for its headers", exc_info=True)
        return response
    for name, value in zip(HEADERS, values, strict=True):
        response.headers[name] = str(value)
    return response


def init_app(app: Flask, token_rate_limit: str, storage: Storage) -> None:
    if not token_rate_limit:
        return
    app.extensions[_EXTENSION] = TokenBudget(parse(token_rate_limit), storage)
    app.after_request(_headers)
    log.info("token budget on: %s per client", token_rate_limit)
