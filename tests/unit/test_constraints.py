"""Structured output below the scheduler: compiling Constraints (tursi.engine.constraints:
the 400s for unusable inputs, the LRU cache, one matcher per choice) and the sampler's mask
(choose_tokens with matchers: only tokens the grammar allows, ids past the tokenizer never,
after logit_bias and before temperature, logprobs of the raw distribution).

What a grammar allows is checked against the tokenizer's own texts (the tokens whose text
continues a choice), not against llguidance's view of them. No model: logits are made up.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.helpers import build_tokenizer, choice_continuations
from tursi.engine.constraints import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_CHARS,
    Constraints,
    GrammarError,
    _last_allowed,
    _short,
)
from tursi.engine.jobs import Constraint, SamplingParams
from tursi.engine.sampling import TokenChooser, choose_tokens, mask_logits, token_logprobs
from tursi.errors import InvalidRequest

WIDTH = 416  # logits width: the tokenizer's 400 ids and 16 rows of padding


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def constraints(tokenizer) -> Constraints:
    return Constraints(tokenizer, WIDTH, [tokenizer.eos_token_id])


def schema(value: dict) -> Constraint:
    return Constraint("json_schema", json.dumps(value, separators=(",", ":")))


def refusal(constraints: Constraints, constraint: Constraint) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        constraints.matchers(constraint)
    assert raised.value.status == 400
    assert raised.value.details["field"] == "structured_outputs"
    assert raised.value.details["kind"] == constraint.kind
    return raised.value


def deep_schema(levels: int) -> dict:
    value: dict = {"type": "integer"}
    for _ in range(levels):
        value = {"type": "object", "properties": {"x": value}, "required": ["x"]}
    return value


# (constraint, a piece of the 400's message)
UNUSABLE = [
    (Constraint("json_schema", "{"), "the JSON schema is not JSON"),
    (Constraint("json_schema", "[1, 2]"), "must be an object"),
    (Constraint("json_schema", "false"), "must be an object"),
    (schema({"type": "foo"}), "Invalid type: foo"),
    (schema({"type": "object", "dependentRequired": {"a": ["b"]}}), "dependentRequired"),
    (schema({"$ref": "#/$defs/missing"}), "not usable"),
    (schema({"type": "string", "pattern": "(a"}), "unclosed group"),
    (schema(deep_schema(200)), "recursion limit"),
    (Constraint("json_schema", "{" + " " * MAX_SCHEMA_CHARS + "}"), "the limit is 65536"),
    (Constraint("regex", "(a"), "unclosed group"),
    (Constraint("regex", "[^\\x00-\\x{10FFFF}]"), "matches no text"),
    (Constraint("regex", "a{1000}{1000}"), "too complex"),
    # Inside llguidance's default limits (they compile it, in 0.6 s here): Tursi's refuse it.
    (Constraint("regex", "a{400}{400}"), "too complex"),
    (Constraint("regex", "((a{100}){100}){100}"), "too complex"),
    (Constraint("regex", "a" * (MAX_REGEX_CHARS + 1)), "the limit is 8192"),
    (Constraint("choice", ()), "the choice list is empty"),
    (Constraint("choice", ("a",) * (MAX_CHOICES + 1)), "the limit is 256"),
    (Constraint("choice", ("a", "b" * (MAX_CHOICE_CHARS + 1))), "choice 1 is 1025 characters"),
    (Constraint("choice", ("a", 3)), "choice 1 is not a string"),  # type: ignore[arg-type]
    (Constraint("grammar", ""), "Empty grammar"),
    (Constraint("grammar", "start: foo"), 'unknown name: "foo"'),
    (Constraint("grammar", 'root ::= ( "yes" '), "the GBNF grammar cannot be read"),
    (Constraint("grammar", "root ::= missing"), "the GBNF grammar cannot be read"),
]


@pytest.mark.parametrize(("constraint", "message"), UNUSABLE)
def test_an_unusable_constraint_is_a_400_naming_the_problem(constraints, constraint, message):
    error = refusal(constraints, constraint)
    assert error.message.startswith("structured_outputs: ")
    assert message in error.message


def test_the_json_schemas_of_real_tasks_compile(constraints):
    """What clients send: pydantic-style $defs and $ref, enums, bounds, formats, anyOf."""
    person = {
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}}},
        "type": "object",
        "properties": {
            "name": {"type": "string", "title": "Name", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "height": {"type": "number", "exclusiveMinimum": 0},
            "email": {"type": "string", "format": "email"},
            "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "maxItems": 3},
            "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    anything = Constraint("json_schema", "true")
    for constraint in [schema(person), anything, Constraint("json_object")]:
        (matcher,) = constraints.matchers(constraint)
        assert not matcher.complete and not matcher.error


def test_compiled_matchers_are_cached_per_constraint_and_copied_per_choice(tokenizer):
    constraints = Constraints(tokenizer, WIDTH, [tokenizer.eos_token_id], capacity=2)
    a, b, c = (Constraint("choice", (word,)) for word in ("a", "b", "c"))
    first = constraints.compiled(a)
    assert constraints.compiled(Constraint("choice", ["a"])) is first  # equal constraint: a hit
    assert (constraints.hits, constraints.misses) == (1, 1)
    matchers = constraints.matchers(a, 3)
    assert len({id(m) for m in matchers} | {id(first)}) == 4  # n copies, none the cached one
    assert (constraints.hits, constraints.misses) == (2, 1)
    constraints.compiled(b)
    constraints.compiled(a)  # a is now the most recently used
    constraints.compiled(c)  # evicts b, the least recently used
    assert constraints.compiled(a) is first
    assert constraints.misses == 3
    constraints.compiled(b)
    assert constraints.misses == 4
    with pytest.raises(InvalidRequest):  # refusals are not cached matchers
        constraints.compiled(Constraint("regex", "(a"))


def test_a_choice_advances_its_own_matcher_and_refuses_tokens_outside_the_grammar(
    constraints, tokenizer
):
    yes, other = constraints.matchers(Constraint("choice", ("yes", "no")), 2)
    for token in tokenizer("yes")["input_ids"]:
        yes.advance(token)
    assert yes.complete and not other.complete  # copies do not share state
    with pytest.raises(GrammarError):
        other.advance(tokenizer("x")["input_ids"][0])
    assert other.error


# --- the mask in choose_tokens --------------------------------------------------------------


CHOICES = ("Once upon", "The quick", "Models load")


def constrained(constraints, **params) -> TokenChooser:
    (matcher,) = constraints.matchers(Constraint("choice", CHOICES))
    return TokenChooser(SamplingParams(**params), matcher=matcher)


def test_greedy_and_sampled_rows_pick_only_allowed_tokens_never_ids_past_the_tokenizer(
    constraints, tokenizer
):
    allowed = choice_continuations(tokenizer, "", CHOICES)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, WIDTH, generator=generator)
    logits[:, len(tokenizer) :] += 1000.0  # the padding rows would win every choice
    rows = [
        constrained(constraints, temperature=0.0),
        TokenChooser(SamplingParams(temperature=0.0)),
        constrained(constraints, temperature=1.5, seed=3, top_k=50),
        constrained(constraints, temperature=1.0, seed=4),
    ]
    for _ in range(20):
        tokens = choose_tokens(logits, rows)
        assert tokens[1] >= len(tokenizer)  # the unconstrained row takes the padding
        assert {tokens[0], tokens[2], tokens[3]} <= allowed
    best = max(allowed, key=lambda token: logits[0, token])
    assert tokens[0] == best


def test_the_mask_comes_after_logit_bias_and_before_the_cuts(constraints, tokenizer):
    """logit_bias cannot lift a refused token past the mask, and top_k, top_p and min_p cut
    among the allowed tokens (after the mask): a cut to the single best token keeps the best
    allowed one, not a refused one that the bias made the best overall."""
    allowed = choice_continuations(tokenizer, "", CHOICES)
    refused = next(t for t in range(len(tokenizer)) if t not in allowed)
    favourite, other = sorted(allowed)[:2]
    logits = torch.zeros(1, WIDTH)
    logits[0, other] = 1.0
    bias = {refused: 100.0, favourite: 5.0}
    assert choose_tokens(logits, [constrained(constraints, temperature=0.0, logit_bias=bias)]) == [
        favourite
    ]
    for cut in ({"top_k": 1}, {"top_p": 0.01}, {"min_p": 0.99}):
        for seed in range(5):
            row = constrained(constraints, seed=seed, logit_bias={refused: 100.0}, **cut)
            assert choose_tokens(logits, [row]) == [other], cut


def test_logprobs_stay_those_of_the_raw_distribution(constraints, tokenizer):
    logits = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(5))
    rows = [constrained(constraints, temperature=0.0, logprobs=2), constrained(constraints)]
    tokens = choose_tokens(logits, rows)
    (entry, none) = token_logprobs(logits, tokens, rows)
    raw = torch.log_softmax(logits[0], -1)
    assert none is None
    assert math.isclose(entry.logprob, float(raw[tokens[0]]), abs_tol=1e-5)
    assert [t for t, _ in entry.top] == raw.topk(2).indices.tolist()  # refused tokens too


def test_a_row_whose_grammar_allows_nothing_more_is_left_to_fail_alone(constraints, tokenizer):
    """A matcher that failed (here: a token refused) gets no mask: the batch's draw goes on,
    and the row's next token fails its own request in remember."""
    broken = constrained(constraints, temperature=1.0, seed=2)
    with pytest.raises(GrammarError):
        broken.remember(tokenizer("zzz")["input_ids"][0])
    fine = constrained(constraints, temperature=1.0, seed=2)
    logits = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(1))
    masked = logits.clone()
    mask_logits(masked, [broken, fine])
    assert torch.equal(masked[0], logits[0])  # the broken row: untouched
    assert (masked[1] <= -1e29).sum() > WIDTH // 2  # the other: most tokens refused
    tokens = choose_tokens(logits, [broken, fine])
    assert tokens[1] in choice_continuations(tokenizer, "", CHOICES)
    with pytest.raises(GrammarError):
        broken.remember(tokens[0])


def test_a_regex_row_follows_its_pattern_token_by_token(constraints, tokenizer):
    (matcher,) = constraints.matchers(Constraint("regex", "[0-9]{3}-[a-z]{2,5}"))
    row = TokenChooser(SamplingParams(temperature=1.0, seed=9), matcher=matcher)
    generator = torch.Generator().manual_seed(2)
    out: list[int] = []
    while not row.complete and len(out) < 20:
        (token,) = choose_tokens(torch.randn(1, WIDTH, generator=generator), [row])
        row.remember(token)
        if row.ends_output(token):
            break
        out.append(token)
    assert re.fullmatch("[0-9]{3}-[a-z]{2,5}", tokenizer.decode(out))


def allowed(matcher) -> set[int]:
    """The token ids a matcher's next bitmask allows."""
    mask = torch.zeros(matcher.words, dtype=torch.int32)
    matcher.fill(mask)
    bits = torch.tensor([(int(word) >> j) & 1 for word in mask.tolist() for j in range(32)])
    return set(torch.nonzero(bits).flatten().tolist())


# (constraint, the whole 400 message after "structured_outputs: ")
EXACT = [
    (Constraint("json_schema", "[1, 2]"), "the JSON schema must be an object (or true)"),
    (Constraint("choice", ()), "the choice list is empty"),
    (
        Constraint("choice", ("a",) * (MAX_CHOICES + 1)),
        f"the choice list has {MAX_CHOICES + 1} entries; the limit is {MAX_CHOICES}",
    ),
    (
        Constraint("regex", "a" * (MAX_REGEX_CHARS + 1)),
        f"the regex is {MAX_REGEX_CHARS + 1} characters long; the limit is {MAX_REGEX_CHARS}",
    ),
]


@pytest.mark.parametrize(("constraint", "message"), EXACT)
def test_the_400_says_exactly_what_is_wrong(constraints, constraint, message):
    error = refusal(constraints, constraint)
    assert error.message == f"structured_outputs: {message}"
    assert "error" not in error.details  # no llguidance error behind these


@pytest.mark.parametrize(
    ("constraint", "lead", "why"),
    [
        (schema({"type": "foo"}), "the JSON schema is not usable: ", "foo"),
        # JSON that llguidance cannot take as a schema (a lone surrogate, an integer past
        # 64 bits): refused before any matcher is built.
        (
            Constraint("json_schema", '{"const": "\\ud800"}'),
            "the JSON schema is not usable: ",
            "ud800",
        ),
        (
            Constraint("json_schema", '{"enum": [1' + "0" * 30 + "]}"),
            "the JSON schema is not usable: ",
            "0" * 30,
        ),
        (
            Constraint("grammar", 'root ::= ( "yes" '),
            "the GBNF grammar cannot be read: ",
            "Expected ')'",
        ),
    ],
)
def test_llguidances_reason_is_in_the_message_and_the_details(constraints, constraint, lead, why):
    error = refusal(constraints, constraint)
    reason = error.details["error"]
    assert why in reason and "<non-verbose/>" not in reason
    assert error.message == f"structured_outputs: {lead}{reason}"


def test_inputs_at_each_size_limit_compile(constraints):
    """The limits are inclusive: a schema, regex, choice list and choice exactly at theirs
    compile (one character or entry more is the 400 above)."""
    padded = "{" + " " * (MAX_SCHEMA_CHARS - 2) + "}"  # {}: any JSON, MAX_SCHEMA_CHARS long
    assert len(padded) == MAX_SCHEMA_CHARS
    for constraint in (
        Constraint("json_schema", padded),
        Constraint("regex", "a" * MAX_REGEX_CHARS),
        Constraint("choice", tuple(f"c{i}" for i in range(MAX_CHOICES))),
        Constraint("choice", ("a" * MAX_CHOICE_CHARS,)),
    ):
        assert constraints.matchers(constraint)


def test_a_json_object_is_compact_from_its_first_brace(tokenizer):
    """json_object: an object (not any JSON value), compact (no whitespace before it, nor
    inside it). Compiled here, not taken from the module's cache."""
    constraints = Constraints(tokenizer, WIDTH, [tokenizer.eos_token_id])
    (matcher,) = constraints.matchers(Constraint("json_object", ""))
    first = {tokenizer.decode([token]) for token in allowed(matcher)}
    assert first and all(text.startswith("{") for text in first), sorted(first)
    matcher.advance(tokenizer.encode("{", add_special_tokens=False)[0])
    after = {tokenizer.decode([token]) for token in allowed(matcher)}
    assert "}" in after and not any(text[:1].isspace() for text in after), sorted(after)


def test_a_gbnf_grammar_is_read_as_the_same_language(constraints, tokenizer):
    """llama.cpp's GBNF, converted to Lark: its texts are the grammar's (here two words)."""
    (matcher,) = constraints.matchers(Constraint("grammar", 'root ::= "yes" | "no"'))
    assert allowed(matcher) == choice_continuations(tokenizer, "", ("yes", "no"))


def test_a_choice_of_non_ascii_text_matches_that_text(constraints, tokenizer):
    for text in ("café", "😀"):
        (matcher,) = constraints.matchers(Constraint("choice", (text,)))
        for token in tokenizer.encode(text, add_special_tokens=False):
            matcher.advance(token)
        assert matcher.complete, text


def test_the_mask_covers_the_models_logits_and_the_grammar_ends_on_the_models_eos(tokenizer):
    """A model whose logits are wider than its tokenizer (a padded table): the bitmask has a
    bit for every logit. The grammar's end of sequence is the model's eos ids (here not the
    tokenizer's own), so a complete choice allows exactly those."""
    width = 1600  # 50 words of 32 bits
    constraints = Constraints(tokenizer, width, [7, 9])
    (matcher,) = constraints.matchers(Constraint("choice", ("a",)))
    assert matcher.words == -(-width // 32)
    assert matcher.eos == frozenset({7, 9})
    matcher.advance(tokenizer.encode("a", add_special_tokens=False)[0])
    assert allowed(matcher) == {7, 9}


def test_a_tokenizer_llguidance_cannot_read_is_a_400(tokenizer):
    constraints = Constraints(object(), WIDTH, [tokenizer.eos_token_id])
    with pytest.raises(InvalidRequest) as raised:
        constraints.matchers(Constraint("regex", "a"))
    error = raised.value
    assert error.status == 400 and error.details == {"field": "structured_outputs"}
    assert error.message.startswith(
        "Structured output is not available for this model: its tokenizer cannot be read "
        "for constrained decoding ("
    )
    assert error.message.endswith(")") and not error.message.endswith("(None)")  # the reason


def test_llguidances_messages_are_trimmed():
    assert _short(" <non-verbose/>boom ") == "boom"
    long = "x" * 600
    assert _short(long) == "x" * 497 + "..." and len(_short(long)) == 500
    assert _short("y" * 500) == "y" * 500


def test_the_highest_allowed_id_of_a_bitmask():
    mask = torch.zeros(3, dtype=torch.int32)
    mask[0] = 1
    assert _last_allowed(mask) == 0
    mask[1] = 0b101
    assert _last_allowed(mask) == 32 + 2
    mask[2] = -(2**31)  # bit 31 alone: the sign bit of an int32 word
    assert _last_allowed(mask) == 2 * 32 + 31
    mask[2] = -1  # every bit
    assert _last_allowed(mask) == 2 * 32 + 31


@pytest.mark.parametrize(
    ("constraint", "lead"),
    [
        (Constraint("regex", "[^\\x00-\\x{10FFFF}]"), "the regex matches no text"),
        (Constraint("regex", "a{1000}{1000}"), "the regex is too complex: "),
    ],
)
def test_what_only_compiling_finds_is_named_with_llguidances_reason(constraints, constraint, lead):
    error = refusal(constraints, constraint)
    reason = error.details["error"]  # llguidance's reason: both give one
    assert reason
    if lead.endswith(": "):
        assert error.message == f"structured_outputs: {lead}{reason}"
    else:
        assert error.message == f"structured_outputs: {lead}"


def test_a_grammar_whose_only_text_is_empty_allows_only_the_end(constraints, tokenizer):
    """Accepting before any token (an empty regex): a usable grammar, not "matches no
    text"; only end of sequence may follow."""
    (matcher,) = constraints.matchers(Constraint("regex", ""))
    assert allowed(matcher) == {tokenizer.eos_token_id}


def test_a_refused_token_says_so(constraints, tokenizer):
    (matcher,) = constraints.matchers(Constraint("choice", ("yes",)))
    with pytest.raises(GrammarError) as raised:
        matcher.advance(tokenizer.encode("zzz", add_special_tokens=False)[0])
    assert str(raised.value) and "XX" not in str(raised.value)
    assert str(raised.value) == (matcher.error or "token refused")
