"""Generation mechanics on a tiny random model (milliseconds): prefill, EOS, limits."""

import contextlib
import math
import types

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

import mlxq
from mlxq.attention import attend
from mlxq.errors import MlxqError
from mlxq.generate import GenerationResponse, stream_generate

VOCAB, EOS = 257, 256


class ByteTokenizer:
    """Bytes are tokens; 256 is EOS. Enough of mlx-lm's TokenizerWrapper for generation."""

    bos_token = None
    has_chat_template = False

    def __init__(self):
        self.eos_token_ids = {EOS}

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    @property
    def detokenizer(self):
        return NaiveStreamingDetokenizer(self)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.rope = nn.RoPE(self.head_dim)

    def __call__(self, x, cache=None):
        B, L, _ = x.shape

        def heads(t, n):
            return t.reshape(B, L, n, -1).transpose(0, 2, 1, 3)

        q = heads(self.q_proj(x), self.n_heads)
        k = heads(self.k_proj(x), self.n_kv_heads)
        v = heads(self.v_proj(x), self.n_kv_heads)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        out = attend(q, k, v, cache, scale=1 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class TinyModel(nn.Module):
    def __init__(self, dim=32, n_layers=2, context=1024):
        super().__init__()
        self.args = types.SimpleNamespace(max_position_embeddings=context)
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = [Attention(dim, 4, 2) for _ in range(n_layers)]
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def __call__(self, tokens, cache=None):
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            # No residual: the output then depends strongly on attention (and the mask).
            h = layer(h, cache[i] if cache is not None else None)
        return self.lm_head(self.norm(h))


@pytest.fixture(scope="module")
def tiny():
    mx.random.seed(0)
    model = TinyModel()
    mx.eval(model.parameters())
    return model, ByteTokenizer()


@contextlib.contextmanager
def _eos(tok, ids):
    saved, tok.eos_token_ids = tok.eos_token_ids, ids
    try:
        yield
    finally:
        tok.eos_token_ids = saved


def _tokens(model, tok, prompt, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, **kw)]


def _no_cache_greedy(model, prompt_ids, n):
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(mx.argmax(model(mx.array(ids)[None])[0, -1]).item())
    return ids[len(prompt_ids):]


def test_cached_greedy_equals_uncached(tiny):
    model, tok = tiny
    # 325 varied tokens: the caches cross 256 during prefill.
    prompt = mx.random.randint(0, 256, (325,), key=mx.random.key(5)).tolist()
    with _eos(tok, set()):  # compare the raw token stream
        got = _tokens(model, tok, prompt, max_tokens=8, prefill_step_size=100)
    assert got == _no_cache_greedy(model, prompt, 8)


def test_chunked_prefill_equals_one_shot(tiny):
    model, tok = tiny
    prompt = list(range(40, 240)) * 2  # 400 token ids
    with _eos(tok, set()):
        one_shot = _tokens(model, tok, prompt, max_tokens=6, prefill_step_size=4096)
        for step in (1, 7, 256):
            assert _tokens(model, tok, prompt, max_tokens=6, prefill_step_size=step) == one_shot


def test_responses_and_length_limit(tiny):
    model, tok = tiny
    with _eos(tok, set()):
        responses = list(stream_generate(model, tok, "abc", max_tokens=5))
    assert all(isinstance(r, GenerationResponse) for r in responses)
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    last = responses[-1]
    assert last.generation_tokens == 5 and last.prompt_tokens == 3
    assert last.kv_nbytes > 0 and last.kv_fp16_nbytes > 0 and last.peak_memory > 0
    assert last.prompt_tps > 0 and last.generation_tps > 0


def test_stops_at_any_eos_id(tiny):
    model, tok = tiny
    with _eos(tok, set()):
        free = _tokens(model, tok, "xyz", max_tokens=10)
    stop = free[3]
    first = free.index(stop)
    with _eos(tok, {stop, 12345}):
        responses = list(stream_generate(model, tok, "xyz", max_tokens=10))
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].generation_tokens == first + 1
    text = "".join(r.text for r in responses)
    assert text == tok.decode(free[:first])  # the EOS token itself is not printed


def test_context_length_limits(tiny):
    model, tok = tiny
    small = TinyModel(context=16)
    small.update(model.parameters())
    with pytest.raises(MlxqError, match="context is 16"):
        list(stream_generate(small, tok, "x" * 17))
    with _eos(tok, set()):
        # 12 prompt tokens leave room for 5 generated ones (the last is never fed back).
        responses = list(stream_generate(small, tok, "x" * 12, max_tokens=100))
    assert responses[-1].generation_tokens == 5
    assert responses[-1].finish_reason == "length"


def test_bad_options(tiny):
    model, tok = tiny
    with pytest.raises(MlxqError, match="max_tokens"):
        list(stream_generate(model, tok, "x", max_tokens=0))
    with pytest.raises(MlxqError, match="kv_bits"):
        list(stream_generate(model, tok, "x", kv_bits=5))
    with pytest.raises(MlxqError, match="empty"):
        list(stream_generate(model, tok, []))


def test_module_is_callable(tiny):
    model, tok = tiny
    text = mlxq.generate(model, tok, "abc", max_tokens=4, temp=1.0, seed=3)
    again = mlxq.generate(model, tok, "abc", max_tokens=4, temp=1.0, seed=3)
    assert isinstance(text, str) and text == again
    assert mlxq.stream_generate is stream_generate
