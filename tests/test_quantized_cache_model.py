"""The default model with the int4 cache: the emulated kernels generate the same greedy
tokens as the reference path, through the cache's growth boundary (256 tokens)."""

import pytest

import mlxq.attention as attention
from mlxq.generate import stream_generate

# The quantized tokens cross 256 during decoding: the buffers grow.
QUANTIZED_AT_START = 245
MAX_TOKENS = 16

TEXT = (
    "The lighthouse stood on the northern cliff for two hundred years. Every night the "
    "keeper climbed the spiral stairs, trimmed the wick and watched the ships pass. "
) * 20


def _greedy_tokens(model, tokenizer, prompt_ids, monkeypatch, backend, recent):
    monkeypatch.setenv("MLXQ_KERNELS", backend)
    seen = []
    real = attention.segmented_decode_attention

    def spy(*args, **kwargs):
        seen.append(args[-1])  # the backend the fused kernel ran on
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "segmented_decode_attention", spy)
    tokens = [r.token for r in stream_generate(
        model, tokenizer, prompt_ids, max_tokens=MAX_TOKENS, kv_bits=4, kv_group_size=64,
        kv_recent=recent)]
    monkeypatch.undo()
    return tokens, seen


@pytest.mark.parametrize("recent", [0, 64])
def test_emulated_kernels_generate_the_reference_tokens(default_model, monkeypatch, recent):
    model, tokenizer = default_model
    n_prompt = QUANTIZED_AT_START + recent
    ids = tokenizer.encode(TEXT)[:n_prompt]
    assert len(ids) == n_prompt
    ref, ref_kernels = _greedy_tokens(model, tokenizer, ids, monkeypatch, "reference", recent)
    emu, emu_kernels = _greedy_tokens(model, tokenizer, ids, monkeypatch, "emulate", recent)
    assert len(ref) == MAX_TOKENS
    n_layers = len(model.layers)
    # Every decode step of every layer went through the fused kernel on the emulator;
    # the reference backend never runs a kernel.
    assert emu_kernels.count("emulate") >= (MAX_TOKENS - 1) * n_layers
    assert ref_kernels == []
    assert emu == ref
