"""A batch of sequences decoding together, each at its own length, equals each sequence
decoded alone: the same logits at every step, on the reference backend (the oracle with
per-sequence positions), on the emulated kernels (per-sequence lengths) and with the
full-precision cache (a per-sequence mask); a sequence taken out of the batch
(``extract``) is the cache it would have had alone."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_config, tiny_weights

from mlxq.batch_cache import BatchKVCache, BatchQuantizedKVCache
from mlxq.kernels.kv_layout import CENTER_BLOCK
from mlxq.cache import KVCache, make_cache
from mlxq.errors import MlxqError
from mlxq.kv_config import KVCacheConfig
from mlxq.models import build_model

CONFIG = KVCacheConfig(4, 32, recent=8, sink=2)
# A window of a whole key-center block: rows are written as tokens leave it.
LEAVING = KVCacheConfig(4, 32, recent=CENTER_BLOCK, sink=2)
FULL = KVCacheConfig(16, step=16)
PROMPTS = [1, 5, 20]  # still in the sink, window filling, past the window


@pytest.fixture(scope="module")
def model():
    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    m = build_model(config)
    m.load_weights([(k, mx.array(v)) for k, v in
                    m.sanitize({k: mx.array(v) for k, v in tiny_weights(config).items()}).items()])
    return m


def _prefill(model, tokens, backend, config=CONFIG):
    caches = make_cache(model, config, backend=backend)
    logits = model(mx.array([tokens]), cache=caches)
    return caches, logits[:, -1]


def _batch(per_sequence):
    layers = len(per_sequence[0])
    batch_class = BatchKVCache if isinstance(per_sequence[0][0], KVCache) else \
        BatchQuantizedKVCache
    return [batch_class([caches[i] for caches in per_sequence]) for i in range(layers)]


@pytest.mark.parametrize("backend, config, lengths", [
    ("reference", CONFIG, PROMPTS), ("emulate", CONFIG, PROMPTS), ("reference", FULL, PROMPTS),
    ("emulate", LEAVING, [1, CENTER_BLOCK - 6, CENTER_BLOCK + 9]),  # windows fill, rows leave
])
def test_batched_decode_equals_each_sequence_alone(model, backend, config, lengths):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 300, n).tolist() for n in lengths]
    alone = [_prefill(model, p, backend, config) for p in prompts]
    batch = _batch([_prefill(model, p, backend, config)[0] for p in prompts])
    assert batch[0].lengths == lengths
    for step in range(12):  # every sequence crosses its sink or window edge
        tokens = [int(rng.integers(1, 300)) for _ in prompts]
        batched = model(mx.array(tokens)[:, None], cache=batch)[:, -1]
        for i, (caches, _) in enumerate(alone):
            single = model(mx.array([[tokens[i]]]), cache=caches)[:, -1]
            np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single[0]),
                                       atol=1e-4, rtol=1e-4)
    assert batch[0].lengths == [n + 12 for n in lengths]


@pytest.mark.parametrize("config", [CONFIG, FULL])
def test_sequences_join_and_leave(model, config):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 300, n).tolist() for n in (3, 9, 14)]
    alone = [_prefill(model, p, "reference", config)[0] for p in prompts]
    batch = _batch([_prefill(model, p, "reference", config)[0] for p in prompts[:2]])
    # The middle of three steps: sequence 2 joins; then sequence 0 leaves.
    for step in range(3):
        if step == 1:
            joining = _batch([_prefill(model, prompts[2], "reference", config)[0]])
            for layer, other in zip(batch, joining):
                layer.extend(other)
        if step == 2:
            for layer in batch:
                layer.filter([1, 2])
        members = {0: [0, 1], 1: [0, 1, 2], 2: [1, 2]}[step]
        tokens = [int(rng.integers(1, 300)) for _ in members]
        batched = model(mx.array(tokens)[:, None], cache=batch)[:, -1]
        for row, i in enumerate(members):
            single = model(mx.array([[tokens[row]]]), cache=alone[i])[:, -1]
            np.testing.assert_allclose(np.asarray(batched[row]), np.asarray(single[0]),
                                       atol=1e-4, rtol=1e-4)
        # A sequence outside the batch this step skips it alone too.
    assert batch[0].lengths == [9 + 3, 14 + 2]


def test_a_batch_refuses_mixed_options_and_empty_sequences(model):
    a = make_cache(model, CONFIG, backend="reference")
    b = make_cache(model, KVCacheConfig(8), backend="reference")
    model(mx.array([[1, 2, 3]]), cache=a)
    model(mx.array([[1, 2, 3]]), cache=b)
    with pytest.raises(MlxqError, match="same KV cache options"):
        BatchQuantizedKVCache([a[0], b[0]])
    with pytest.raises(MlxqError, match="prefill"):
        BatchQuantizedKVCache([make_cache(model, CONFIG)[0]])


def _address(a):
    return np.asarray(a).__array_interface__["data"][0]


@pytest.mark.parametrize("config", [CONFIG, FULL])
def test_batched_steps_write_in_place(model, config):
    batch = _batch([_prefill(model, list(range(1, n + 1)), "reference", config)[0]
                    for n in (4, 20)])
    mx.eval([c.state for c in batch])
    for step in range(3):
        before = [[_address(x) for x in c.state] for c in batch]
        mx.eval(model(mx.array([[1], [2]]), cache=batch))
        assert [[_address(x) for x in c.state] for c in batch] == before


def _keys(rng, n, heads=2, dim=64):
    return [mx.array(rng.standard_normal((1, heads, n, dim)).astype(np.float32))
            for _ in range(2)]


def _same_cache(got, want):
    """The same stored tokens, lengths and buffer capacities."""
    assert (got.offset, got.window_length, got.head_dim) == \
        (want.offset, want.window_length, want.head_dim)
    for name in ("store", "fp", "centers"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
    for name, value in want.state.items():
        np.testing.assert_array_equal(np.asarray(got.state[name]), np.asarray(value), name)


@pytest.mark.parametrize("config", [CONFIG, KVCacheConfig(4, 32, recent=0, sink=3),
                                    KVCacheConfig(4, 32, recent=140, sink=2), LEAVING,
                                    KVCacheConfig(4, 64, recent=16, sink=1, key_bits=8)])
def test_extract_equals_the_sequence_appended_alone(config):
    """Sequences of 1, 5, 124 tokens (+ one that joins later, and one that leaves) get the
    same tokens appended in a batch and alone: ``extract`` gives back exactly the cache
    decoded alone (rows, float16 slots, key centers, lengths, capacities). A key-center
    block completes in the batch: from the stored rows (short windows) or from the
    window's float16 keys (recent 140 and 128); with a window of 128 the long sequence's
    window fills and its rows are written as tokens leave it."""
    from mlxq.quantized_cache import QuantizedKVCache

    rng = np.random.default_rng(2)
    long = CENTER_BLOCK - 4  # completes a key-center block within the steps below
    prompts = [_keys(rng, n) for n in (1, 5, long, 9)]

    def prefilled(keys_values):
        cache = QuantizedKVCache(config, layer_index=1)
        cache.append(*keys_values)
        return cache

    batch = BatchQuantizedKVCache([prefilled(p) for p in prompts[:3]])
    alone = [prefilled(p) for p in prompts[:3]]
    for step in range(14):  # past the sink and across the window's wrap
        if step == 4:  # a newcomer joins and a sequence leaves
            batch.extend(BatchQuantizedKVCache([prefilled(prompts[3])]))
            alone.append(prefilled(prompts[3]))
            batch.filter([0, 2, 3])
            del alone[1]
        k, v = (mx.array(rng.standard_normal((len(alone), 2, 1, 64)).astype(np.float32))
                for _ in range(2))
        batch.append(k, v)
        for i, cache in enumerate(alone):
            cache.append(k[i:i + 1], v[i:i + 1])
    assert batch.lengths == [c.offset for c in alone] == [15, long + 14, 19]
    for i, cache in enumerate(alone):
        _same_cache(batch.extract(i), cache)


@pytest.mark.parametrize("config", [CONFIG, FULL])
def test_extracted_caches_predict_what_the_sequence_alone_predicts(model, config):
    """After batched decode steps of the model, each extracted sequence's caches give the
    next logits of that sequence decoded alone, and keep decoding as their own caches."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 300, n).tolist() for n in PROMPTS]
    alone = [_prefill(model, p, "reference", config)[0] for p in prompts]
    batch = _batch([_prefill(model, p, "reference", config)[0] for p in prompts])
    for step in range(4):
        tokens = [int(rng.integers(1, 300)) for _ in prompts]
        model(mx.array(tokens)[:, None], cache=batch)
        for i, caches in enumerate(alone):
            model(mx.array([[tokens[i]]]), cache=caches)
    for i, caches in enumerate(alone):
        extracted = [layer.extract(i) for layer in batch]
        if config is FULL:  # the same keys and values, the same capacity
            for got, want in zip(extracted, caches):
                assert (got.offset, got.keys.shape) == (want.offset, want.keys.shape)
                for a, b in zip(got.state, want.state):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        for step in range(2):
            token = mx.array([[int(rng.integers(1, 300))]])
            np.testing.assert_allclose(np.asarray(model(token, cache=extracted)),
                                       np.asarray(model(token, cache=caches)),
                                       atol=1e-4, rtol=1e-4)
    assert batch[0].lengths == [n + 4 for n in PROMPTS]  # the batch itself is unchanged


@pytest.mark.parametrize("recent", [70, CENTER_BLOCK + 2])  # rows on arrival / on leaving
def test_byte_formulas_agree_with_the_caches(recent):
    """``quantized_nbytes`` is what a cache allocates, however its tokens arrived;
    ``batch_nbytes`` bounds a batch's bytes at every step (and is reached)."""
    from mlxq.batch_cache import batch_nbytes
    from mlxq.quantized_cache import QuantizedKVCache, quantized_nbytes

    config = KVCacheConfig(4, 32, recent=recent, sink=4, step=16)
    rng = np.random.default_rng(5)
    for chunks in ([1], [3], [4, 1], [50], [7, 60, 1, 1], [200, 30], [133, 1, 1, 400]):
        cache = QuantizedKVCache(config)
        for n in chunks:
            cache.append(*_keys(rng, n))
            assert cache.nbytes == quantized_nbytes(config, 2, 64, cache.offset), chunks
    caches = []
    for n in (2, 40, 75):
        caches.append(QuantizedKVCache(config))
        caches[-1].append(*_keys(rng, n))
    batch = BatchQuantizedKVCache(caches)
    reached = False
    for step in range(40):
        B = len(batch.lengths)
        bound = batch_nbytes(config, 2, 64, B, max(batch.lengths) + 1)
        assert batch.nbytes <= bound
        reached |= batch.nbytes == bound
        batch.append(*(mx.zeros((B, 2, 1, 64)) for _ in range(2)))
        if step == 20:
            batch.filter([0, 1])  # the longest leaves: the store shrinks with it
            assert batch.nbytes == batch_nbytes(config, 2, 64, 2, max(batch.lengths) + 1)
    assert reached


def test_full_precision_byte_formula_agrees_with_the_caches():
    from mlxq.batch_cache import full_precision_nbytes

    rng = np.random.default_rng(6)
    caches = []
    for n in (1, 16, 17, 40):
        caches.append(KVCache(step=16, dtype=mx.float32))
        caches[-1].update_and_fetch(*_keys(rng, n))
        assert caches[-1].nbytes == full_precision_nbytes(16, 2, 64, 4, 1, n)
    batch = BatchKVCache(caches)
    for step in range(30):
        B = len(batch.lengths)
        assert batch.nbytes <= full_precision_nbytes(16, 2, 64, 4, B, max(batch.lengths) + 1)
        batch.update_and_fetch(*(mx.zeros((B, 2, 1, 64)) for _ in range(2)))
        if step == 5:
            batch.filter([0, 1])  # the longest leaves: the rows shrink with it
            assert batch.nbytes == full_precision_nbytes(16, 2, 64, 4, 2, max(batch.lengths) + 1)
