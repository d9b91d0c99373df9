"""The default model with the int4 cache: the emulated kernels generate the same greedy
tokens as the reference path, through the cache's growth boundary (256 tokens)."""

import mlxq.quantized_cache as qc
from mlxq.generate import stream_generate

PROMPT_TOKENS = 245  # 245 + 16 generated > 256: the buffers grow during decoding
MAX_TOKENS = 16

TEXT = (
    "The lighthouse stood on the northern cliff for two hundred years. Every night the "
    "keeper climbed the spiral stairs, trimmed the wick and watched the ships pass. "
) * 20


def _greedy_tokens(model, tokenizer, prompt_ids, monkeypatch, backend):
    monkeypatch.setenv("MLXQ_KERNELS", backend)
    seen = []
    real = qc.quantized_decode_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(qc, "quantized_decode_attention", spy)
    tokens = [r.token for r in stream_generate(
        model, tokenizer, prompt_ids, max_tokens=MAX_TOKENS, kv_bits=4, kv_group_size=64)]
    monkeypatch.undo()
    return tokens, seen


def test_emulated_kernels_generate_the_reference_tokens(default_model, monkeypatch):
    model, tokenizer = default_model
    ids = tokenizer.encode(TEXT)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    ref, ref_backends = _greedy_tokens(model, tokenizer, ids, monkeypatch, "reference")
    emu, emu_backends = _greedy_tokens(model, tokenizer, ids, monkeypatch, "emulate")
    assert len(ref) == MAX_TOKENS
    n_layers = len(model.layers)
    # Every decode step of every layer went through the fused kernel on the emulator.
    assert emu_backends.count("emulate") >= MAX_TOKENS * n_layers
    assert set(ref_backends) == {"reference"}
    assert emu == ref
