"""Structured output: a request's Constraint compiled into grammar matchers for one model.

The grammar work is llguidance's (docs/structured-output.md says why it, not xgrammar or
outlines-core): it turns a JSON schema, a regex, a list of choices or a Lark grammar into a
matcher that, at each step, gives the set of tokens of the model's vocabulary that keep the
output inside the grammar (a bitmask), and consumes the token chosen. This module:
- compiles a Constraint for one model's tokenizer, with bounded work (LLParserLimits) and
  bounded inputs, turning every invalid, unsupported or too large input into a 400 that names
  the problem (never a 500, never a matcher that fails later at its first step);
- keeps the compiled matchers in an LRU cache per model (a matcher compiled once, copied per
  choice: `deep_copy` costs microseconds, a compile about a millisecond, some seconds);
- wraps a choice's matcher (`Matcher`) for the sampler and the scheduler: fill the row's
  bitmask, advance by the chosen token, tell when the grammar is complete.

JSON is compiled without flexible whitespace: with it, a small model can write spaces or
newlines between tokens until max_tokens (seen with the embedded model), and compact JSON is
what the caller parses anyway.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import InvalidRequest
from ..threads import native_lock
from .jobs import Constraint

# Sizes of what a request may ask for: each well above what a schema, a pattern or a
# grammar written for a real task needs, and well below what makes a compile slow (a
# 2,000-property schema, ~60 KB, takes half a second). The API checks them too, earlier.
MAX_SCHEMA_CHARS = 65_536  # a JSON schema, as compact JSON text
MAX_REGEX_CHARS = 8_192
MAX_GRAMMAR_CHARS = 32_768
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_024  # each choice
CACHE_SIZE = 256  # compiled matchers kept per model

# llguidance's work limits, below its defaults where a pathological input otherwise costs
# seconds (a regex such as a{1000}{1000}: 2 s for its first mask with the default fuel).
# initial fuel bounds building the lexer (~50k a ms); step fuel and items bound each mask,
# which runs on the engine thread inside the batch (~14k and ~20k a ms).
_LIMITS = {
    "initial_lexer_fuel": 200_000,
    "step_lexer_fuel": 50_000,
    "step_max_items": 20_000,
    "max_grammar_size": 100_000,
    "verbose_errors": False,  # errors name the problem, without the parser's state dump
}
_MAX_MESSAGE = 500  # characters of llguidance's error kept in a 400's message
_JSON_OPTIONS = {"whitespace_flexible": False}

FIELD = "structured_outputs"


class GrammarError(RuntimeError):
    """A choice's matcher refused a token or failed a step (its work limits): that choice's
    request fails, the batch goes on."""


class Matcher:
    """One choice's grammar state: an llguidance matcher of its own, advanced token by token.
    `eos`: the end-of-sequence ids the grammar knows (ending the output where the grammar
    allows it); `words`: int32 words of its bitmask (one bit per id of the vocabulary)."""

    __slots__ = ("eos", "words", "_matcher")

    def __init__(self, matcher: Any, eos: frozenset[int], words: int):
        self._matcher = matcher
        self.eos = eos
        self.words = words

    def fill(self, row: torch.Tensor) -> bool:
        """Write the bitmask of the tokens allowed next into `row` (contiguous int32 CPU,
        `words` long; bit j of word w: token 32 w + j). False when the matcher has failed or
        allows nothing: the row is then left for `advance` to fail on whatever is chosen."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        return not self._matcher.is_error() and bool(row.any())

    def advance(self, token: int) -> None:
        """Consume the chosen token; GrammarError when the grammar refuses it."""
        if not self._matcher.consume_token(token):
            raise GrammarError(self.error or "token refused")

    @property
    def error(self) -> str:
        """Why the matcher failed ("" while it has not)."""
        return _short(self._matcher.get_error()) if self._matcher.is_error() else ""

    @property
    def complete(self) -> bool:
        """True when the output is complete: only end of sequence could follow."""
        return self._matcher.is_stopped()

    def copy(self) -> Matcher:
        return Matcher(self._matcher.deep_copy(), self.eos, self.words)


class Constraints:
    """Compiles Constraints for one model: `matchers(constraint, n)` gives n fresh matchers
    (one per choice) or raises InvalidRequest. Safe from any thread; meant to run off the
    gevent hub (a compile takes about a millisecond, a large one much more, and drops the
    GIL). `width` is the model's logits width: ids past the tokenizer's (a padded table) are
    never allowed. The llguidance tokenizer is built on first use (about a second for a 49k
    vocabulary), not at load: most servers never constrain."""

    def __init__(
        self, tokenizer: Any, width: int, eos_ids: Iterable[int], capacity: int = CACHE_SIZE
    ):
        self._hf_tokenizer = tokenizer
        self._width = width
        self._eos = sorted(eos_ids)
        self._capacity = capacity
        self._lock = native_lock()  # the cache and its counters
        self._building = native_lock()  # the llguidance tokenizer, built once
        self._tokenizer: Any = None
        self._cache: collections.OrderedDict[Constraint, Matcher] = collections.OrderedDict()
        self.hits = self.misses = 0

    def matchers(self, constraint: Constraint, n: int = 1) -> list[Matcher]:
        """n matchers of `constraint`, each its own copy of the compiled one."""
        pristine = self.compiled(constraint)
        with self._lock:  # copies of one matcher, one at a time
            return [pristine.copy() for _ in range(n)]

    def compiled(self, constraint: Constraint) -> Matcher:
        """The compiled matcher of `constraint` (from the cache when it was compiled
        before); never advanced: copy it."""
        with self._lock:
            found = self._cache.get(constraint)
            if found is not None:
                self._cache.move_to_end(constraint)
                self.hits += 1
                return found
            self.misses += 1
        matcher = self._compile(constraint)  # outside the lock: others may hit meanwhile
        with self._lock:
            self._cache[constraint] = matcher
            self._cache.move_to_end(constraint)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return matcher

    def _compile(self, constraint: Constraint) -> Matcher:
        import llguidance

        grammar = grammar_text(constraint)  # sizes first: no tokenizer built to refuse them
        tokenizer = self._llg_tokenizer()
        limits = llguidance.LLParserLimits(**_LIMITS)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        words = -(-tokenizer.vocab_size // 32)
        compiled = Matcher(matcher, frozenset(tokenizer.eos_tokens), words)
        # The first mask now, off the engine thread: part of the work is lazy (a pattern's
        # lexer), and a grammar that fails or allows nothing is a 400 here, not a failure
        # at the choice's first step. Then one step further on a copy (the allowed token of
        # the highest id, often the longest): a pattern whose lexer explodes, such as
        # a{1000}{1000}, exceeds its limits there.
        name = _NAMES[constraint.kind]
        if matcher.is_error():
            error = _short(matcher.get_error())
            raise invalid(constraint, f"{name} is not usable: {error}", error)
        mask = torch.zeros(words, dtype=torch.int32)
        if not compiled.fill(mask) or (matcher.is_stopped() and not matcher.is_accepting()):
            error = _short(matcher.get_error()) or None
            raise invalid(constraint, f"{name} matches no text", error)
        if not matcher.is_stopped():
            probe = compiled.copy()
            try:
                probe.advance(_last_allowed(mask))
                probe.fill(mask)
            except GrammarError:
                pass
            if probe.error:
                raise invalid(constraint, f"{name} is too complex: {probe.error}", probe.error)
        return compiled

    def _llg_tokenizer(self) -> Any:
        with self._building:
            if self._tokenizer is None:
                import llguidance.hf

                hf = self._hf_tokenizer
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        hf,
                        n_vocab=max(self._width, len(hf)),
                        eos_token=self._eos or None,
                    )
                except Exception as exc:  # a slow tokenizer, or one llguidance cannot read
                    raise InvalidRequest(
                        f"Structured output is not available for this model: its tokenizer "
                        f"cannot be read for constrained decoding ({_short(str(exc))})",
                        {"field": FIELD},
                    ) from None
            return self._tokenizer


_NAMES = {
    "json_schema": "the JSON schema",
    "json_object": "the JSON object grammar",
    "regex": "the regex",
    "choice": "the choice list",
    "grammar": "the grammar",
}


def invalid(constraint: Constraint, message: str, error: str | None = None) -> InvalidRequest:
    """The 400 of a constraint the engine cannot use."""
    details = {"field": FIELD, "kind": constraint.kind}
    if error is not None:
        details["error"] = error
    return InvalidRequest(f"{FIELD}: {message}", details)


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar text of `constraint`, its size checked; InvalidRequest when it
    is too large or cannot be read (the matcher then checks the rest)."""
    from llguidance import LLMatcher

    kind, value = constraint.kind, constraint.value
    if kind == "choice":
        return LLMatcher.grammar_from_lark(_choice_lark(constraint))
    assert isinstance(value, str)
    limit = {"json_schema": MAX_SCHEMA_CHARS, "regex": MAX_REGEX_CHARS}.get(kind, MAX_GRAMMAR_CHARS)
    if len(value) > limit:
        raise invalid(
            constraint, f"{_NAMES[kind]} is {len(value)} characters long; the limit is {limit}"
        )
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise invalid(constraint, f"the JSON schema is not JSON: {exc}") from None
        if schema is True:  # JSON Schema's "anything"
            schema = {}
        if not isinstance(schema, dict):
            raise invalid(constraint, "the JSON schema must be an object (or true)")
        try:
            return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except ValueError as exc:
            error = _short(str(exc))
            raise invalid(constraint, f"the JSON schema is not usable: {error}", error) from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

    if "::=" in value and not is_lark_syntax(value):  # GBNF (llama.cpp's): made Lark
        try:
            value = gbnf_to_lark(value)
        except Exception as exc:  # GbnfToLarkError, and whatever else a bad text raises
            error = _short(str(exc))
            raise invalid(constraint, f"the GBNF grammar cannot be read: {error}", error) from None
    return LLMatcher.grammar_from_lark(value)


def _choice_lark(constraint: Constraint) -> str:
    """A Lark grammar whose only texts are the choices (JSON string literals are Lark's)."""
    choices = constraint.value
    if not choices:
        raise invalid(constraint, "the choice list is empty")
    if len(choices) > MAX_CHOICES:
        raise invalid(
            constraint, f"the choice list has {len(choices)} entries; the limit is {MAX_CHOICES}"
        )
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise invalid(constraint, f"choice {i} is not a string")
        if len(choice) > MAX_CHOICE_CHARS:
            raise invalid(
                constraint,
                f"choice {i} is {len(choice)} characters long; the limit is {MAX_CHOICE_CHARS}",
            )
    return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _last_allowed(mask: torch.Tensor) -> int:
    """The highest token id a bitmask allows (it allows one)."""
    word = int(torch.nonzero(mask).max())
    return word * 32 + int(mask[word]).bit_length() - 1 if mask[word] > 0 else word * 32 + 31


def _short(error: str) -> str:
    """llguidance's error message, trimmed for a response (without its marker of the
    parser's state left out: verbose_errors is off)."""
    error = error.replace("<non-verbose/>", "").strip()
    return error if len(error) <= _MAX_MESSAGE else error[: _MAX_MESSAGE - 3] + "..."
