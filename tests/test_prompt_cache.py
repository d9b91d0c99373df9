"""python -m mlxq.cache_prompt and mlxq.generate --prompt-cache-file (one save/load)."""

import mlx.core as mx
import numpy as np
import pytest

import mlxq
from mlxq import cache_prompt, generate
from mlxq.cache import make_cache
from mlxq.prompt_cache import PromptCache, load_prompt_cache, reuse_prefix, save_prompt_cache

DOC = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture
def tiny_model_dir(hf_checkpoint):
    # head_dim 64: the int4 cache's smallest supported head size.
    folder, _, _ = hf_checkpoint(hidden_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=512, dtype="float32")
    return folder


def run_cli(module, argv, capsys):
    code = module.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cached_prompt_gives_the_same_text(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "doc.safetensors"
    model_args = ["--model", str(tiny_model_dir), "--ignore-chat-template"]
    code, _, err = run_cli(cache_prompt, [*model_args, "--prompt", DOC,
                                          "--prompt-cache-file", str(path)], capsys)
    assert code == 0 and path.exists() and "saved" in err
    question = DOC + "What jumps?"
    gen = [*model_args, "--prompt", question, "--max-tokens", "8"]
    code, cold, err = run_cli(generate, gen, capsys)
    assert code == 0 and "cached" not in err
    code, warm, err = run_cli(generate, [*gen, "--prompt-cache-file", str(path)], capsys)
    assert code == 0
    assert warm == cold and cold.strip()
    # The document's tokens (all but where the question's tokens start) came from the file.
    n_doc = len(mlxq.load(tiny_model_dir)[1].encode(DOC))
    assert f"({n_doc - 1} cached)" in err or f"({n_doc} cached)" in err, err


def test_loaded_cache_holds_the_prompts_keys_and_values(tiny_model_dir, tmp_path):
    """Against another computation: a fresh prefill of the same tokens."""
    model, tokenizer = mlxq.load(tiny_model_dir)
    ids = list(tokenizer.encode(DOC))
    caches = make_cache(model, kv_bits=16)
    model(mx.array(ids)[None], cache=caches)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, PromptCache(caches, ids))
    loaded = load_prompt_cache(path, model, {"kv_bits": 16})
    assert loaded.tokens == ids
    fresh = make_cache(model, kv_bits=16)
    model(mx.array(ids)[None], cache=fresh)
    for a, b in zip(loaded.caches, fresh):
        for x, y in zip(a.state, b.state):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)
    # Reuse keeps the common prefix, always leaving the last prompt token to feed.
    other = ids[:10] + [5, 6, 7]
    assert reuse_prefix(loaded, other) == 10
    assert all(c.offset == 10 for c in loaded.caches) and loaded.tokens == ids[:10]
    assert reuse_prefix(load_prompt_cache(path, model, {"kv_bits": 16}), ids) == len(ids) - 1


def test_other_kv_options_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "int4.safetensors"
    base = ["--model", str(tiny_model_dir), "--prompt", DOC]
    assert run_cli(cache_prompt, [*base, "--kv-bits", "4", "--prompt-cache-file", str(path)],
                   capsys)[0] == 0
    for other in (["--kv-bits", "16"], ["--kv-bits", "4", "--kv-recent", "8"],
                  ["--kv-bits", "4", "--no-kv-rotation"], ["--kv-bits", "8"]):
        code, out, err = run_cli(generate, [*base, "--max-tokens", "2",
                                            "--prompt-cache-file", str(path), *other], capsys)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "was saved with the KV cache int4-g64" in err, err
    # The same options are accepted.
    code, out, _ = run_cli(generate, [*base, "--max-tokens", "2", "--kv-bits", "4",
                                      "--prompt-cache-file", str(path)], capsys)
    assert code == 0


def test_cache_prompt_file_errors(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "c.safetensors"
    path.write_text("not a cache")
    base = ["--model", str(tiny_model_dir), "--prompt", DOC, "--prompt-cache-file", str(path)]
    code, _, err = run_cli(cache_prompt, base, capsys)
    assert code == 2 and "already exists" in err and path.read_text() == "not a cache"
    code, _, err = run_cli(generate, ["--model", str(tiny_model_dir), "--prompt", "x",
                                      "--prompt-cache-file", str(path)], capsys)
    assert code == 2 and "not a saved mlxq cache" in err and err.count("\n") == 1
    code, _, err = run_cli(generate, ["--prompt", "x", "--prompt-cache-file",
                                      str(tmp_path / "missing")], capsys)
    assert code == 2 and "no such file" in err
    assert run_cli(cache_prompt, [*base, "--force"], capsys)[0] == 0


def test_a_cache_of_another_model_is_refused(tiny_model_dir, hf_checkpoint, tmp_path, capsys):
    path = tmp_path / "c.safetensors"
    assert run_cli(cache_prompt, ["--model", str(tiny_model_dir), "--prompt", DOC,
                                  "--prompt-cache-file", str(path)], capsys)[0] == 0
    other, _, _ = hf_checkpoint(name="three-layers", num_hidden_layers=3, hidden_size=256,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=512)
    code, _, err = run_cli(generate, ["--model", str(other), "--prompt", "x",
                                      "--prompt-cache-file", str(path)], capsys)
    assert code == 2 and "another model" in err


# --- models with sliding-window layers (Gemma 3's layout, tiny and random) ------------------
WINDOW = 8
DOC_IDS = 30  # prompt tokens in the saved cache: more than the window, so it has slid


@pytest.fixture(scope="module")
def window_model_dir(tmp_path_factory):
    """A random gemma3_text folder: layers 0-4 slide over 8 tokens, layer 5 is global."""
    return _gemma_folder(tmp_path_factory.mktemp("gemma-window"), WINDOW)


def _gemma_folder(folder, window, seed=0):
    import json

    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from conftest import write_tiny_tokenizer

    config = {"model_type": "gemma3_text", "hidden_size": 256, "num_hidden_layers": 6,
              "intermediate_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "rms_norm_eps": 1e-6, "vocab_size": 300, "rope_theta": 10000.0,
              "max_position_embeddings": 512, "sliding_window": window,
              "sliding_window_pattern": 6, "query_pre_attn_scalar": 64,
              "rope_local_base_freq": 10000.0, "eos_token_id": 0}
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    write_tiny_tokenizer(folder)
    return folder


def _random_ids(n, seed):
    return [int(t) for t in mx.random.randint(3, 300, (n,), key=mx.random.key(seed)).tolist()]


def _greedy(model, tokenizer, ids, prompt_cache=None, kv_bits=16):
    from mlxq.generate import stream_generate

    out = list(stream_generate(model, tokenizer, ids, max_tokens=6, temp=0.0,
                               prompt_cache=prompt_cache, kv_bits=kv_bits))
    return [r.token for r in out], out[-1].prompt_cached_tokens


# prefill step 1: the ring wraps in place, holding exactly the window; step 5: chunks, the
# window holds its 7 latest tokens plus the last chunk.
@pytest.mark.parametrize("kv_bits", [16, 4])
@pytest.mark.parametrize("step", [1, 5])
def test_window_caches_save_and_load(window_model_dir, tmp_path, kv_bits, step):
    """Generating with a loaded cache gives the ids generating from scratch gives, whether
    the later prompt extends the cached one, repeats it, or leaves it inside the window."""
    from mlxq.generate import prefill_chunks
    from mlxq.window_cache import WindowKVCache

    model, tokenizer = mlxq.load(window_model_dir)
    doc = _random_ids(DOC_IDS, 1)
    caches = make_cache(model, kv_bits=kv_bits)
    for _ in prefill_chunks(model, doc + [doc[-1]], caches, step):
        pass
    windows = [c for c in caches if isinstance(c, WindowKVCache)]
    assert len(windows) == 5 and all(c.offset == DOC_IDS for c in caches)
    held = WINDOW if step == 1 else WINDOW - 1 + step
    assert all(c.held() == held for c in windows)  # tokens have left the window
    path = tmp_path / "gemma.safetensors"
    save_prompt_cache(path, PromptCache(caches, doc))
    # (prompt, tokens reused): forgetting 2 tokens is possible only when the window holds
    # more than the window needs; otherwise nothing is reused (recomputed, never wrong).
    cases = [(doc + _random_ids(5, 2), DOC_IDS), (doc, DOC_IDS - 1),
             (doc[:DOC_IDS - 2] + _random_ids(3, 3), 0 if step == 1 else DOC_IDS - 2),
             (doc[:12] + _random_ids(3, 4), 0)]
    for prompt, reused in cases:
        loaded = load_prompt_cache(path, model, {"kv_bits": kv_bits})
        got, cached = _greedy(model, tokenizer, prompt, loaded, kv_bits)
        assert cached == reused
        assert got == _greedy(model, tokenizer, prompt, kv_bits=kv_bits)[0]


def test_window_trim_refuses_what_the_ring_lost(window_model_dir):
    from mlxq.cache import copy_caches

    model, _ = mlxq.load(window_model_dir)
    caches = make_cache(model)
    for t in _random_ids(20, 5):
        model(mx.array([[t]]), cache=caches)
    window = caches[0]
    assert window.held() == WINDOW and window.can_trim(1) and not window.can_trim(2)
    with pytest.raises(ValueError, match="too few"):
        window.trim(2)
    copy = copy_caches([window])[0]
    assert copy.trim(20) == 20 and copy.offset == 0 and copy.keys is None
    assert window.offset == 20  # the copy is independent


def test_window_cache_cli_round_trip(window_model_dir, tmp_path, capsys):
    path = tmp_path / "doc.safetensors"
    model_args = ["--model", str(window_model_dir), "--ignore-chat-template"]
    code, _, err = run_cli(cache_prompt, [*model_args, "--prompt", DOC, "--kv-bits", "4",
                                          "--prompt-cache-file", str(path)], capsys)
    assert code == 0 and "saved" in err
    gen = [*model_args, "--prompt", DOC + "What jumps?", "--max-tokens", "6", "--kv-bits", "4"]
    code, cold, _ = run_cli(generate, gen, capsys)
    assert code == 0
    code, warm, err = run_cli(generate, [*gen, "--prompt-cache-file", str(path)], capsys)
    assert code == 0 and warm == cold and "cached)" in err
    # Another sliding window (same weights otherwise) is refused in one line.
    other = _gemma_folder(tmp_path / "wider", 2 * WINDOW)
    code, out, err = run_cli(generate, ["--model", str(other), *gen[2:],
                                        "--prompt-cache-file", str(path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "saved with the KV cache fp-window8 but this run uses fp-window16" in err, err
