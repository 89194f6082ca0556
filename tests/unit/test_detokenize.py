"""IncrementalDecoder: whole characters only, spaces kept after the prompt."""

import pytest

from tursi.engine.detokenize import IncrementalDecoder


@pytest.fixture(scope="module")
def tokenizer(tiny_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models_dir / "llama")


@pytest.mark.parametrize(
    "text", ["é 🙂 €", "Ünïcödé text, emoji 🙂 and symbols €", "日本語 and 🙂🙂"]
)
def test_decoder_emits_whole_characters(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # the multi-byte characters take several tokens
    decoder = IncrementalDecoder(tokenizer, [])
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some bytes were held back until their character was complete


def test_decoder_holds_incomplete_character(tokenizer):
    ids = tokenizer("é")["input_ids"]
    assert len(ids) == 2  # two byte tokens
    decoder = IncrementalDecoder(tokenizer, [])
    assert decoder.push(ids[0]) == ""
    assert decoder.push(ids[1]) == "é"


def test_decoder_after_prompt_keeps_spaces(tokenizer):
    prompt = tokenizer("Once upon a time")["input_ids"]
    continuation = tokenizer(" there was 🙂 €")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = [decoder.push(i) for i in continuation]
    assert "".join(pieces) == " there was 🙂 €"
    assert pieces[0] == " there"
    assert all("\ufffd" not in piece for piece in pieces)
