"""Gemma-3-270M from its GGUF (the second offline model): SentencePiece tokenizer, Gemma's
GGUF conventions, parity with mlx-lm and the int4 cache on sliding-window layers.

Converted once per session (conftest.gemma_model_dir)."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlxq
from mlxq.cache import make_cache

from conftest import mlx_lm_float32

PASSAGE = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
    "money in my purse, and nothing particular to interest me on shore, I thought I would "
    "sail about a little and see the watery part of the world. It is a way I have of "
    "driving off the spleen and regulating the circulation. Whenever I find myself growing "
    "grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I "
    "find myself involuntarily pausing before coffin warehouses, and bringing up the rear "
    "of every funeral I meet; and especially whenever my hypos get such an upper hand of "
    "me, that it requires a strong moral principle to prevent me from deliberately "
    "stepping into the street, and methodically knocking people's hats off, then, I "
    "account it high time to get to sea as soon as I can."
)


@pytest.fixture(scope="module")
def tok(gemma_model):
    return gemma_model[1]


# --- tokenizer (built from the GGUF's tokens, scores and token types) ----------------------

def test_ids_are_the_gguf_vocabulary_pieces(tok):
    # Golden ids: the pieces' positions in the GGUF's tokenizer.ggml.tokens (checked with
    # gguf.GGUFReader); <bos> (2) first because the file sets add_bos_token.
    assert tok.encode("Hello world") == [2, 9259, 1902]
    ids = tok.encode("Once upon a time, there was")
    assert ids == [2, 14946, 3324, 496, 990, 236764, 993, 691]
    assert tok.convert_ids_to_tokens(ids[1:]) == [
        "Once", "▁upon", "▁a", "▁time", ",", "▁there", "▁was"]


def test_whitespace_runs_and_control_tokens_stay_whole(tok):
    # Gemma stores runs of spaces/newlines as user-defined tokens (llama.cpp matches them
    # in the raw text), and control tokens are never split.
    ids = tok.encode("The  quick\n\nbrown<start_of_turn>user", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "The", "  ", "quick", "\n\n", "brown", "<start_of_turn>", "user"]


def test_unknown_characters_fall_back_to_bytes(tok):
    ids = tok.encode("\x07", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["<0x07>"]


@pytest.mark.parametrize("text", [
    PASSAGE, "naïve café — 東京 🤖 ½", "  leading spaces\tand\ttabs\n\n\nend ",
    "x = [1, 2, 3]  # code\nprint(x)",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # mlx-lm's streaming detokenizer (SentencePiece, no leading-space trim) agrees.
    detok = tok.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text


# --- Gemma's GGUF conventions --------------------------------------------------------------

def test_config_from_gguf_metadata(gemma_model_dir):
    config = json.loads((gemma_model_dir / "config.json").read_text())
    expected = {
        "model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 2048, "vocab_size": 262144, "sliding_window": 512,
        "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "bos_token_id": 2,
        "eos_token_id": 1,
    }
    assert {k: config[k] for k in expected} == expected
    q = config["quantization"]
    # K-quants / Q5_0 re-quantized to the default 4-bit g64; the Q8_0 embedding lossless.
    assert (q["bits"], q["group_size"]) == (4, 64)
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}


def test_norm_weights_are_stored_plus_one_in_the_gguf(gemma_model_dir, tmp_path):
    """llama.cpp writes Gemma's RMSNorm weight w as 1 + w; the import takes the 1 back off."""
    from gguf import GGUFReader

    from mlxq.gemma_model import assemble_gguf

    reader = GGUFReader(str(assemble_gguf(tmp_path)))
    stored = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors
              if t.name in ("output_norm.weight", "blk.3.attn_q_norm.weight",
                            "blk.3.post_ffw_norm.weight")}
    from safetensors import safe_open

    weights = {}
    with safe_open(str(gemma_model_dir / "model.safetensors"), framework="numpy") as f:
        for name in f.keys():
            if name.endswith("norm.weight"):
                weights[name] = f.get_tensor(name)
    for gguf_name, ours in (("output_norm.weight", "model.norm.weight"),
                            ("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight"),
                            ("blk.3.post_ffw_norm.weight",
                             "model.layers.3.post_feedforward_layernorm.weight")):
        np.testing.assert_allclose(np.array(weights[ours]), stored[gguf_name] - 1, atol=1e-6)


# --- the model ----------------------------------------------------------------------------

def _nll(model, ids, caches):
    logits = model(mx.array([ids[:-1]]), cache=caches)[0]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -logp[mx.arange(len(ids) - 1), mx.array(ids[1:])], logits


@pytest.mark.slow
def test_logits_and_greedy_tokens_match_mlx_lm(gemma_model, gemma_model_dir):
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = gemma_model
    theirs = mlx_lm_float32(gemma_model_dir)
    # Every logit row costs a 262144-word output layer on the CPU: keep sequences short.
    ids = tok.encode(PASSAGE)[:33]
    nll, ours = _nll(model, ids, make_cache(model))
    theirs_logits = theirs(mx.array([ids[:-1]]), cache=make_prompt_cache(theirs))[0]
    np.testing.assert_allclose(np.array(ours), np.array(theirs_logits), atol=1e-3, rtol=1e-3)
    # A language model on English prose: measured ~69 here (int4 re-quantized weights);
    # leaving the GGUF's 1 + w in the norms gives ~1.7e8.
    ppl = float(mx.exp(nll.mean()))
    assert ppl < 150, ppl
    prompt = "The capital of France is"
    text = mlxq.generate(model, tok, prompt, max_tokens=8, temp=0.0)
    from mlx_lm import generate as mlx_lm_generate

    assert text == mlx_lm_generate(theirs, tok, prompt, max_tokens=8)
    assert len(text.split()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("key_bits", [None, 4])
def test_int4_cache_on_global_layers_stays_close(gemma_model, key_bits):
    """Pure int4 values (no full-precision window) on the three global layers, windows on
    the sliding ones: the mean next-token loss over a 48-token passage stays within 5%,
    with Gemma's default 8-bit keys (kv_defaults.py) and with 4-bit keys asked for."""
    model, tok = gemma_model
    ids = tok.encode(PASSAGE)[:49]
    caches = make_cache(model, kv_bits=4, kv_recent=0, kv_sink=0, kv_key_bits=key_bits)
    quantized = [c for c in caches if type(c).__name__ == "QuantizedKVCache"]
    assert len(quantized) == 3
    assert {c.config.keys_bits for c in quantized} == {key_bits or 8}
    # Prefill 32 tokens, then decode: every later token reads the quantized buffers.
    full, _ = _nll(model, ids, make_cache(model))
    logits = [model(mx.array([ids[:32]]), cache=caches)[0]]
    for t in ids[32:-1]:
        logits.append(model(mx.array([[t]]), cache=caches)[0])
    logits = mx.concatenate(logits, axis=0)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    int4 = -logp[mx.arange(len(ids) - 1), mx.array(ids[1:])]
    assert abs(float(int4.mean()) - float(full.mean())) < 0.05 * float(full.mean())


@pytest.mark.slow
def test_generate_cli_with_int4_cache(gemma_model_dir):
    r = subprocess.run(
        [sys.executable, "-m", "mlxq.generate", "--model", str(gemma_model_dir),
         "--prompt", "Once upon a time", "--max-tokens", "12", "--temp", "0", "--kv-bits", "4"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 5
    assert "KV cache (int4-k8-g64-rot-kc-w304-s4)" in r.stderr  # Gemma's default keys


@pytest.mark.slow
def test_prompt_cache_with_wrapped_windows(gemma_model, tmp_path):
    """A saved prompt cache (15 window layers + three int4 global layers in one file)
    gives the greedy ids of generating from scratch. The window is cut from 512 to 32
    tokens for this test so the 64-token prompt slides past it cheaply (a prompt past 512
    tokens costs ~1 min per prefill here on the CPU)."""
    from mlxq.generate import prefill_chunks, stream_generate
    from mlxq.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache

    model, tok = gemma_model
    doc = tok.encode(PASSAGE)[:64]
    prompt = doc + tok.encode(" Who tells this story?")[1:]  # [1:]: no second <bos>

    def greedy(prompt_cache=None):
        out = list(stream_generate(model, tok, prompt, max_tokens=4, temp=0.0, kv_bits=4,
                                   prompt_cache=prompt_cache))
        return [r.token for r in out], out[-1].prompt_cached_tokens

    window = model.args.sliding_window
    model.args.sliding_window = model.model.window_size = 32
    try:
        caches = make_cache(model, kv_bits=4)
        for _ in prefill_chunks(model, doc + [doc[-1]], caches, 16):
            pass
        assert [c.held() for c in caches if hasattr(c, "held")] == [32 - 1 + 16] * 15
        path = tmp_path / "gemma.safetensors"
        save_prompt_cache(path, PromptCache(caches, doc))
        warm = greedy(load_prompt_cache(path, model, {"kv_bits": 4}))
        cold = greedy()
    finally:
        model.args.sliding_window = model.model.window_size = window
    assert warm == (cold[0], len(doc)) and cold[1] == 0
