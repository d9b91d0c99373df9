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
