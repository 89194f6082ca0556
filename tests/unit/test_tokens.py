"""tursi.engine.tokens against the tokenizers themselves: each token's (text, bytes) for
byte-fallback pieces (`<0xE2>`), added tokens, vocabulary strings outside the byte-level
alphabet, ids past the tokenizer (padding rows of the logits) and tokenizers without a Rust
backend; and vocab_size for a multimodal checkpoint, against its logits' rows.
(tests/unit/test_worker_requests.py checks the byte-level tokens of a whole corpus.)"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    ByT5Tokenizer,
    Gemma3Config,
    PreTrainedTokenizerFast,
)

from tests.helpers import build_tokenizer
from tursi.engine.tokens import TokenTexts, vocab_size


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """build_llama's byte-level BPE tokenizer (400 tokens), with two added tokens whose
    text lies in the byte alphabet's Latin-1 range."""
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    tokenizer.add_tokens(["café"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|naïve|>"]})
    return tokenizer


def byte_fallback_tokenizer():
    """A sentencepiece-style tokenizer as Llama 2's tokenizer.json spells one: a BPE over a
    few characters with byte_fallback, so any other character becomes its UTF-8 bytes as
    `<0xXX>` pieces, and Llama's decoder (▁ to space, ByteFallback, Fuse)."""
    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": 1 + byte for byte in range(256)}}
    vocab.update({"▁": 257, "a": 258, "b": 259})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_byte_fallback_pieces_give_their_byte():
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer("aé€b")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces == ["a", "<0xC3>", "<0xA9>", "<0xE2>", "<0x82>", "<0xAC>", "b"]
    texts = TokenTexts(tokenizer)(ids)
    # é is C3 A9 and € is E2 82 AC in UTF-8: each piece holds one of those bytes.
    assert [raw for _, raw in texts] == [b"a", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xac", b"b"]
    assert b"".join(raw for _, raw in texts) == tokenizer.decode(ids).encode("utf-8")
    assert [text for text, _ in texts] == ["a", *["\ufffd"] * 5, "b"]  # partial characters


def test_added_tokens_read_as_the_tokenizer_decodes_them(byte_level):
    """Added and special tokens are not spelled in the byte alphabet even where their
    characters lie in it (é, ï): their bytes are those of the tokenizer's decoding, so a
    text's token bytes join to the UTF-8 of its decoding."""
    ids = byte_level("un café, <|naïve|> é")["input_ids"]
    added = [byte_level.convert_tokens_to_ids(token) for token in ("café", "<|naïve|>")]
    assert set(added) <= set(ids)
    texts = TokenTexts(byte_level)(ids)
    assert b"".join(raw for _, raw in texts) == byte_level.decode(ids).encode("utf-8")
    for token in added:
        decoded = byte_level.decode([token])
        assert texts[ids.index(token)] == (decoded, decoded.encode("utf-8"))


def test_a_vocabulary_string_outside_the_byte_alphabet_reads_as_the_tokenizer_reads_it():
    # A byte-level vocabulary may hold strings not spelled in its alphabet (here one with a
    # plain space); the ByteLevel decoder gives such a token its own UTF-8.
    vocab = {char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["x y"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    token = vocab["x y"]
    assert fast.convert_ids_to_tokens(token) == "x y"
    assert TokenTexts(fast)([token]) == [(fast.decode([token]), fast.decode([token]).encode())]
    assert fast.decode([token]) == "x y"


def test_ids_past_the_tokenizer_read_as_its_decoding(byte_level):
    """A model's logits often have padding rows past its tokenizer, and top logprobs may
    name them: they read as the tokenizer decodes them (nothing)."""
    past = [len(byte_level), len(byte_level) + 15]
    expected = [(byte_level.decode([i]), byte_level.decode([i]).encode()) for i in past]
    assert TokenTexts(byte_level)(past) == expected == [("", b"")] * 2


def test_a_tokenizer_without_a_rust_backend_reads_tokens_as_it_decodes_them():
    tokenizer = ByT5Tokenizer()  # a Python tokenizer: no backend_tokenizer
    ids = tokenizer("hi!")["input_ids"]  # with its </s>
    expected = [(tokenizer.decode([i]), tokenizer.decode([i]).encode()) for i in ids]
    assert TokenTexts(tokenizer)(ids) == expected
    assert [text for text, _ in expected] == ["h", "i", "!", "</s>"]


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to read."""

    def __init__(self, tokenizer):
        self.tokenizer, self.asked = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def convert_ids_to_tokens(self, token_id):
        self.asked.append(token_id)
        return self.tokenizer.convert_ids_to_tokens(token_id)


def test_each_id_is_read_from_the_tokenizer_once(byte_level):
    """Logprobs read the same ids (a top-k per token) over and over: each id costs one
    tokenizer lookup, then comes from the cache."""
    counting = CountingTokenizer(byte_level)
    texts = TokenTexts(counting)
    first = texts([5, 7, 5])
    assert texts([7, 5, 7]) == [first[1], first[0], first[1]]
    assert counting.asked == [5, 7]
    assert first == TokenTexts(byte_level)([5, 7, 5])


def test_vocab_size_of_a_multimodal_checkpoint_is_its_logits_rows(byte_level):
    """Gemma 3 (which AutoModelForCausalLM loads as Gemma3ForConditionalGeneration) keeps
    its vocabulary in text_config; its top-level config has no vocab_size."""
    text = {"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "head_dim": 8}
    text.update(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision.update(num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(config)
    rows = model(input_ids=torch.tensor([[1, 2]])).logits.shape[-1]
    assert rows == 300 < len(byte_level)
    assert vocab_size(byte_level, model) == rows
