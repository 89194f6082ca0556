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
    assert (decoder.push(ids[0]), decoder.incomplete) == ("", True)
    assert (decoder.push(ids[1]), decoder.incomplete) == ("é", False)


def test_a_character_cut_by_the_end_is_no_longer_incomplete(tokenizer):
    ids = tokenizer("é")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, [])
    decoder.push(ids[0])
    assert (decoder.flush(), decoder.incomplete) == ("\ufffd", False)


def test_decoder_after_prompt_keeps_spaces(tokenizer):
    prompt = tokenizer("Once upon a time")["input_ids"]
    continuation = tokenizer(" there was 🙂 €")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = [decoder.push(i) for i in continuation]
    assert "".join(pieces) == " there was 🙂 €"
    assert pieces[0] == " there"
    assert all("\ufffd" not in piece for piece in pieces)


def continuation(tokenizer, prompt, ids):
    """The reference: the tokenizer's decode of prompt and continuation together (special
    tokens skipped), less the decoded prompt."""
    whole = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    return whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]


@pytest.fixture(scope="module")
def long_prompt(tokenizer):
    prompt = tokenizer("Once upon a time there was a small server")["input_ids"]
    assert len(prompt) > 5  # the decode window starts inside the prompt
    return prompt


def test_decoder_skips_special_tokens(tokenizer, long_prompt):
    ids = tokenizer(" that answered")["input_ids"]
    ids = ids[:1] + [tokenizer.eos_token_id] + ids[1:] + [tokenizer.eos_token_id]
    decoder = IncrementalDecoder(tokenizer, long_prompt)
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == continuation(tokenizer, long_prompt, ids) == " that answered"


def test_flush_releases_an_incomplete_character_as_the_tokenizer_decodes_it(tokenizer, long_prompt):
    ids = tokenizer(" that 日本")["input_ids"][:-1]  # the last byte of 本 is missing
    expected = continuation(tokenizer, long_prompt, ids)
    assert expected.startswith(" that 日") and expected.endswith("\ufffd")
    decoder = IncrementalDecoder(tokenizer, long_prompt)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == " that 日"  # the incomplete 本 is held back
    assert decoder.flush() == expected[len(" that 日") :]
    assert decoder.flush() == ""  # released once only


def test_decoder_goes_on_after_a_flush(tokenizer, long_prompt):
    first = tokenizer(" that answered")["input_ids"]
    second = tokenizer(" every request 🙂")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, long_prompt)
    pieces = [decoder.push(i) for i in first] + [decoder.flush()]
    pieces += [decoder.push(i) for i in second]
    assert "".join(pieces) == continuation(tokenizer, long_prompt, first + second)


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A word-level tokenizer that, like Llama's SentencePiece one, drops the leading space
    of the first word it decodes ("▁there" alone decodes to "there")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "▁Once", "▁upon", "▁a", "▁time", "▁there", "▁was"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_special_token_between_words_keeps_the_space(metaspace_tokenizer):
    tokenizer = metaspace_tokenizer
    prompt = tokenizer("Once upon a time")["input_ids"]
    ids = [tokenizer.eos_token_id] + tokenizer(" there was")["input_ids"]
    assert tokenizer.decode(ids[1:2]) == "there"  # a lone word loses its space
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == continuation(tokenizer, prompt, ids) == " there was"
