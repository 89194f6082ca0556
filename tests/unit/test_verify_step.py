"""The verify pass of speculative decoding (tursi.engine.decode.step_logits): several tokens
per row of the running batch in one forward, each row at its own cache length, against an
outside reference: transformers' own forward of the stock model (float32, not optimized by
Tursi) with a DynamicCache, each row's prompt alone and then its new tokens one at a time.

Every decode path: the fused Llama's C++ and torch-ops steps, and transformers' forward
(GPT-2, an unfused Llama, a Llama with eager attention and its additive mask). Quantized
loads: the C++ step against the load's torch reference of the integer math (its forward
with the native kernels switched off). A rollback: rows advance by only the tokens a verify
pass accepted, and the rejected tokens' columns, still in the buffers, change nothing after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import tursi.engine.decode as decode_module
from tests.helpers import build_gpt2, build_llama, prefilled
from tursi.engine import native
from tursi.engine.catalog import CatalogEntry
from tursi.engine.cpu_kernels import fused_llama
from tursi.engine.decode import decode_logits, step_logits
from tursi.engine.kvcache import BatchCache
from tursi.engine.loading import LoadOptions, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Rows of different lengths (one a single token); the tokens each verify pass feeds per row.
PROMPTS = [[5, 17, 42, 8, 99, 23, 61, 4, 77], [300], [7, 12, 250, 31, 9, 40, 2, 19, 88, 6, 5, 61]]
DRAFTS = [[11, 48, 3, 120, 64], [200, 5, 17, 9, 310], [42, 42, 7, 150, 23]]
WIDTHS = [1, 2, 3, 4, 5]

# float32: summation order only (the fused matmuls, SDPA over a longer window).
FLOAT = {"rtol": 1e-4, "atol": 1e-4}
# Quantized: int8 activations round to 1/127 of each token's peak, so a last-bit difference
# upstream (the C++ RMSNorm sums its squares in another order) can move a logit by a few
# hundredths; a mask or position wrong by one moves them by whole units.
QUANTIZED = {"rtol": 0.0, "atol": 0.1}

# name: (model, load options, attention, decode step ops: "native", "torch-ops" or None for
# transformers' forward, whether to fuse)
ENGINES = {
    "llama-native": ("llama", LoadOptions(), "sdpa", "native"),
    "llama-torch-ops": ("llama", LoadOptions(), "sdpa", "torch-ops"),
    "llama-eager": ("llama", LoadOptions(), "eager", None),
    "llama-unfused": ("llama", LoadOptions(), "sdpa", None),
    "gpt2": ("gpt2", LoadOptions(), "sdpa", None),
    "int8-dynamic": ("llama", LoadOptions(True, 8, "dynamic"), "sdpa", "native"),
    "int8-dynamic-torch-ops": ("llama", LoadOptions(True, 8, "dynamic"), "sdpa", "torch-ops"),
    "int4": ("llama", LoadOptions(True, 4, "dynamic"), "sdpa", "native"),
}
FLOAT_ENGINES = [name for name, (_, options, _, _) in ENGINES.items() if not options.quantize]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A Llama (untied head, biases, large random weights, so every logit depends on the
    position and the whole context) and a GPT-2."""
    llama = build_llama(
        tmp_path_factory.mktemp("llama"),
        tie_word_embeddings=False,
        attention_bias=True,
        initializer_range=0.2,
        rms_norm_eps=0.1,
        norm_spread=0.5,
        max_position_embeddings=512,
    )
    gpt2 = build_gpt2(tmp_path_factory.mktemp("gpt2"), initializer_range=0.2, n_positions=512)
    return {"llama": llama, "gpt2": gpt2}


@dataclass
class Engine:
    name: str
    model: Any  # as the server loads it
    ops: str | None
    reference: Any  # float: the stock model; quantized: the load itself (see module doc)


@pytest.fixture(scope="module")
def loads(paths, tmp_path_factory):
    """Each engine's load, made once per module."""
    made: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in made:
            model_name, options, attention, ops = ENGINES[name]
            entry = CatalogEntry(model_name, "local", str(paths[model_name]), dtype="float32")
            home = str(tmp_path_factory.mktemp("home"))
            if name == "llama-unfused":  # transformers' own modules
                model = AutoModelForCausalLM.from_pretrained(paths[model_name]).eval()
            else:
                model = load_model(entry, options.resolved(entry), home).model
            if attention == "eager":
                model.model.set_attn_implementation("eager")
            reference = model
            if not options.quantize:
                reference = AutoModelForCausalLM.from_pretrained(paths[model_name]).eval()
            made[name] = Engine(name, model, ops, reference)
        return made[name]

    return get


@pytest.fixture
def engine(request, loads, monkeypatch):
    """The engine the test's parameter names, on the decode step it names (checked)."""
    engine = loads(request.param)
    if engine.ops == "native" and native.load() is None:
        pytest.skip("native kernels not built (tests/unit/test_native_kernels.py says why)")
    if engine.ops == "torch-ops":
        monkeypatch.setattr(native, "load", lambda: None)
    eager = engine.model.config._attn_implementation == "eager"
    assert (engine.ops is not None) == (fused_llama(engine.model) and not eager)
    if engine.ops is not None:
        assert (decode_module.native_plan(engine.model) is not None) == (engine.ops == "native")
    return engine


def batch(model: Any) -> BatchCache:
    """PROMPTS in a BatchCache, each prefilled alone by `model`, with the mask its attention
    takes."""
    eager = model.config._attn_implementation == "eager"
    return prefilled(model, PROMPTS, boolean_mask=not eager, max_length=511)


def reference_logits(model: Any, prefix: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the logits after each of `tokens` following `prefix`, from
    `model`'s own forward with a DynamicCache, one token at a time (as transformers decodes).
    A quantized load runs its torch reference of the integer math here."""
    cache, out = DynamicCache(), []
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "load", lambda: None)
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
        for token in tokens:
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits
            out.append(logits[0, -1])
    return torch.stack(out)


def tolerance(engine: Engine) -> dict[str, float]:
    return FLOAT if engine.name in FLOAT_ENGINES else QUANTIZED


def verify(engine: Engine, cache: BatchCache, drafts: list[list[int]]) -> torch.Tensor:
    """step_logits of `drafts` (one list per row, all of one width); checks the cache did not
    advance."""
    lengths = list(cache.lengths)
    with torch.inference_mode():
        logits = step_logits(engine.model, torch.tensor(drafts), cache)
    assert cache.lengths == lengths
    assert logits.shape == (len(drafts), len(drafts[0]), engine.model.config.vocab_size)
    return logits


@pytest.mark.parametrize("engine", list(ENGINES), indirect=True)
def test_each_token_of_a_verify_pass_gets_the_logits_of_its_own_sequence(engine):
    """Rows of 9, 1 and 12 tokens, widths 1 to 5: the logits of row r's token j are the
    reference's for the row's prompt and its tokens up to j."""
    want = [reference_logits(engine.reference, p, d) for p, d in zip(PROMPTS, DRAFTS, strict=True)]
    for width in WIDTHS:
        cache = batch(engine.model)
        got = verify(engine, cache, [draft[:width] for draft in DRAFTS])
        for row, expected in enumerate(want):
            torch.testing.assert_close(
                got[row],
                expected[:width],
                **tolerance(engine),
                msg=lambda m, width=width, row=row: f"{width=} {row=} {m}",
            )


@pytest.mark.parametrize("engine", list(ENGINES), indirect=True)
def test_rejected_tokens_leave_no_trace(engine):
    """A verify pass of width 4, each row keeping some of its tokens (2, none, all 4), then
    steps of width 1 and 3: their logits are the reference's for the prompts and the kept
    tokens only. The rejected tokens' keys and values stay in the buffers, inside the longer
    rows' window, and must be masked until they are overwritten."""
    kept = [2, 0, 4]
    cache = batch(engine.model)
    verify(engine, cache, [draft[:4] for draft in DRAFTS])
    cache.advance(kept)
    assert cache.lengths == [len(p) + k for p, k in zip(PROMPTS, kept, strict=True)]
    prefixes = [p + d[:k] for p, d, k in zip(PROMPTS, DRAFTS, kept, strict=True)]
    following = [[60, 61, 62, 63], [70, 71, 72, 73], [80, 81, 82, 83]]
    want = [
        reference_logits(engine.reference, p, f) for p, f in zip(prefixes, following, strict=True)
    ]
    got = verify(engine, cache, [f[:1] for f in following])  # stale columns past each row
    cache.advance([1, 1, 1])
    torch.testing.assert_close(got[:, 0], torch.stack([w[0] for w in want]), **tolerance(engine))
    got = verify(engine, cache, [f[1:] for f in following])
    for row, expected in enumerate(want):
        torch.testing.assert_close(got[row], expected[1:], **tolerance(engine))


@pytest.mark.parametrize("engine", FLOAT_ENGINES, indirect=True)
def test_a_width_one_step_is_the_decode_step_bit_for_bit(engine):
    """decode_logits is step_logits of one token and an advance by one: the same bits, step
    after step."""
    ones, steps = batch(engine.model), batch(engine.model)
    for column in range(3):
        ids = torch.tensor([[draft[column]] for draft in DRAFTS])
        with torch.inference_mode():
            want = decode_logits(engine.model, ids, ones)
            got = step_logits(engine.model, ids, steps)
        steps.advance()
        assert torch.equal(got[:, 0], want)
        assert steps.lengths == ones.lengths


@pytest.mark.parametrize("engine", ["int8-dynamic", "int4"], indirect=True)
def test_quantized_cpp_and_torch_ops_verify_passes_agree(engine, monkeypatch):
    """One quantized load, width 4: the C++ step (integer kernels) and the torch-ops step (the
    torch reference of the integer math) give the same logits within int8's rounding."""
    drafts = [draft[:4] for draft in DRAFTS]
    through_cpp = verify(engine, batch(engine.model), drafts)
    monkeypatch.setattr(native, "load", lambda: None)
    assert decode_module.native_plan(engine.model) is None
    through_torch_ops = verify(engine, batch(engine.model), drafts)
    torch.testing.assert_close(through_cpp, through_torch_ops, **QUANTIZED)
