"""Tiny random models built locally for fast tests: a byte-level BPE tokenizer trained on a
few sentences, and Llama / GPT-2 configs with two small layers. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Once upon a time there was a small server that answered every request.",
    "The quick brown fox jumps over the lazy dog. THE END",
    "Models load, generate tokens and unload; counters count them all.",
    "Ünïcödé text, emoji 🙂 and symbols € keep the decoder honest.",
] * 20
EOS = "<|endoftext|>"


def build_tokenizer(target: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, model_max_length=256
    )
    fast.save_pretrained(target)
    return fast


def build_llama(target: Path, seed: int = 0, **overrides) -> Path:
    """`overrides` change the LlamaConfig (e.g. tie_word_embeddings=False)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(target)
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": True,
            **overrides,
        }
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def build_gpt2(target: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(target)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(target)
    return target


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def with_chat_template(source: Path, target: Path) -> Path:
    """A copy of the tiny model at `source` whose tokenizer has CHAT_TEMPLATE (the tiny
    tokenizers have none), so that chat completions can succeed."""
    import shutil

    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


def write_catalog(path: Path, entries: dict[str, dict]) -> Path:
    path.write_text(json.dumps({"models": entries}, indent=2))
    return path
