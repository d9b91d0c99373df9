"""GGUF (llama.cpp) files -> mlx-lm weights, config and tokenizer.

Q4_0 / Q4_1 / Q8_0 tensors map exactly onto MLX's affine quantization (group 32, one
fp16 scale and bias per group), so they are repacked without loss and keep their bits and
group size. Every other type (K-quants, Q5_0/Q5_1, IQ*, ...) is dequantized to float with
the ``gguf`` package's own dequantizers for the caller to re-quantize. llama-architecture
Q/K rows are in llama.cpp's interleaved rotary order and are un-permuted back to the
Hugging Face (rotate-half) order.

Gemma 3: llama.cpp's converter stores every RMSNorm weight as ``1 + w`` (Gemma computes
``x * (1 + w)``; llama.cpp's norm multiplies by the stored weight), so we subtract 1 to get
the Hugging Face / mlx-lm value back. Its sliding-window pattern (every 6th layer global)
and local RoPE base (10000) are fixed by llama.cpp for the architecture, not stored.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MlxqError

# GGUF architecture -> (HF model_type, HF architectures entry).
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# llama.cpp's fixed Gemma 3 settings (src/llama-model.cpp), absent from the metadata.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms per block: the FFN norms sit before and after the MLP.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {"gemma3": _GEMMA_BLOCK_NAMES}
# GGML type name -> bits of the lossless MLX affine equivalent (all group 32).
NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
NATIVE_GROUP = 32
FLOAT_TYPES = ("F32", "F16", "BF16")


def mlx_name(gguf_name: str, arch: str = "llama") -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None: unknown)."""
    module, _, suffix = gguf_name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{suffix}"
    names = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
    return None


def readable_type(kind: str) -> bool:
    """Whether a GGML tensor type can be imported (natively or via gguf's dequantizers)."""
    from gguf import GGMLQuantizationType, quants

    if kind in FLOAT_TYPES or kind in NATIVE_BITS:
        return True
    traits = getattr(quants, "_type_traits", None)
    if traits is None:  # a gguf release without the table: let dequantize decide later
        return True
    return GGMLQuantizationType[kind] in traits


def unpermute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row interleave: rows (h, d/2, 2) -> (h, 2, d/2)."""
    rows = a.shape[0]
    head_dim = rows // n_heads
    return (
        a.reshape(n_heads, head_dim // 2, 2, *a.shape[1:])
        .swapaxes(1, 2)
        .reshape(a.shape)
    )


# --- lossless repacking of GGML blocks into MLX affine triples --------------------------

def _pack_uint32(values: np.ndarray) -> np.ndarray:
    """(rows, n) uint8 bytes -> (rows, n/4) little-endian uint32 words."""
    return np.ascontiguousarray(values).view("<u4").astype(np.uint32, copy=False)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 32) 4-bit values -> (..., 16) bytes, element 2k in the low nibble (MLX order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGML 4-bit block bytes (..., 16) -> values (..., 32): low nibbles are elements 0-15."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def repack_native(data: np.ndarray, type_name: str):
    """A Q4_0/Q4_1/Q8_0 tensor's raw rows (rows, bytes) -> (weight, scales, biases)."""
    rows = data.shape[0]
    if type_name == "Q4_0":  # |d f16|16 bytes|: w = d * (q - 8)
        blocks = data.reshape(rows, -1, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        packed = _pack_nibbles(_ggml_nibbles(blocks[..., 2:18]))
        biases = d * np.float16(-8)
    elif type_name == "Q4_1":  # |d f16|m f16|16 bytes|: w = d * q + m
        blocks = data.reshape(rows, -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        biases = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        packed = _pack_nibbles(_ggml_nibbles(blocks[..., 4:20]))
    elif type_name == "Q8_0":  # |d f16|32 int8|: w = d * q = d * (q + 128) - 128 d
        blocks = data.reshape(rows, -1, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        packed = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        biases = d * np.float16(-128)
    else:
        raise ValueError(type_name)
    weight = _pack_uint32(packed.reshape(rows, -1))
    return weight, np.ascontiguousarray(d), np.ascontiguousarray(biases)


# --- reading a file ------------------------------------------------------------------------

@dataclass
class GGUFModel:
    path: Path
    arch: str
    meta: dict
    config: dict
    # mlx-lm module path -> {"group_size", "bits"} for layers imported as native triples.
    native: dict = field(default_factory=dict)
    reader: object = None


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        size = os.path.getsize(path)
        reader = GGUFReader(str(path))
    except OSError as e:
        raise MlxqError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors alike
        raise MlxqError(f"{path} is not a valid GGUF file (truncated or corrupt: {e})") from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise MlxqError(f"{path} is truncated: tensor {t.name} extends past the end of the file")
    return reader


def _metadata(reader) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # an odd field we do not need must not stop the import
            continue
    return meta


def _f32(x) -> float:
    # GGUF floats are float32; their shortest decimal form is what the HF config had.
    return float(str(np.float32(x)))


def _llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, base: float) -> dict:
    """Llama-3.1-style RoPE scaling, recovered from the GGUF ``rope_freqs`` factors."""
    from .models.rope import llama3_inv_freq

    factor = float(np.max(rope_freqs))
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    plain = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    expected = plain / llama3_inv_freq(head_dim, base, scaling)
    if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-3):
        raise MlxqError("GGUF rope_freqs do not match Llama-3 RoPE scaling; cannot import them")
    return scaling


def _config(arch: str, meta: dict, tensors: dict) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    model_type, architecture = ARCHS[arch]
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if not np.isscalar(kv_heads):
        raise MlxqError("GGUF files with a per-layer KV head count are not supported")
    head_dim = int(get("attention.key_length") or hidden // heads)
    embd = tensors["token_embd.weight"]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        # GGUF shapes are innermost-first: token_embd is [hidden, vocab].
        "vocab_size": int(embd.shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if arch == "gemma3":
        config.update(_gemma3_config(config, get))
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise MlxqError(f"GGUF RoPE scaling {scaling_type!r} is not supported")
    if "rope_freqs.weight" in tensors:
        freqs = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        config["rope_scaling"] = _llama3_rope_scaling(freqs, head_dim, config["rope_theta"])
    return config


def _gemma3_config(config: dict, get) -> dict:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (62 layers,
    # hidden 5376), which uses hidden / heads: the HF config's query_pre_attn_scalar.
    scalar = hidden // heads if (config["num_hidden_layers"], hidden) == (62, 5376) else config["head_dim"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(get("attention.sliding_window", 512)),
        "sliding_window_pattern": GEMMA3_SLIDING_WINDOW_PATTERN,
        "rope_local_base_freq": _f32(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
    }


def open_gguf(path) -> GGUFModel:
    """Parse and validate a GGUF file (metadata, config, tensor types); reads no weights."""
    path = Path(path)
    reader = _open_reader(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise MlxqError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise MlxqError(f"{path} has no token_embd.weight tensor")
    try:
        config = _config(arch, meta, tensors)
    except (TypeError, ValueError) as e:
        raise MlxqError(f"{path}: incomplete {arch} metadata ({e})") from None
    model = GGUFModel(path=path, arch=arch, meta=meta, config=config, reader=reader)
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        target = mlx_name(name, arch)
        if target is None:
            raise MlxqError(f"{path}: unexpected tensor {name!r} for architecture {arch}")
        kind = t.tensor_type.name
        if not readable_type(kind):
            raise MlxqError(f"{path}: tensor {name} has GGUF type {kind}, which cannot be imported")
        if kind in NATIVE_BITS and target.endswith(".weight"):
            model.native[target[: -len(".weight")]] = {
                "group_size": NATIVE_GROUP,
                "bits": NATIVE_BITS[kind],
            }
    return model


def _float_tensor(t):
    """A non-native tensor as a numpy float array in (rows, cols) order."""
    from gguf import quants

    kind = t.tensor_type.name
    shape = tuple(int(s) for s in reversed(t.shape))
    if kind == "F32":
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if kind == "F16":
        return np.asarray(t.data).view(np.float16).reshape(shape)
    try:
        return quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    except NotImplementedError:
        raise MlxqError(f"GGUF tensor type {kind} ({t.name}) cannot be dequantized") from None


def read_weights(model: GGUFModel, progress: bool = False) -> dict:
    """All tensors under mlx-lm names as MLX arrays: native types as (weight, scales,
    biases) triples, everything else as float (BF16 kept as bfloat16, others as stored)."""
    import mlx.core as mx
    from tqdm import tqdm

    heads = model.config["num_attention_heads"]
    kv_heads = model.config["num_key_value_heads"]
    unpermute = {}
    if model.arch == "llama":  # qwen archs use NEOX rope in llama.cpp: rows not permuted
        unpermute = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}

    # Gemma: llama.cpp stored 1 + w for every RMSNorm weight (see the module docstring).
    norm_offset = 1.0 if model.arch == "gemma3" else 0.0

    out = {}
    tensors = [t for t in model.reader.tensors if t.name != "rope_freqs.weight"]
    for t in tqdm(tensors, desc="reading GGUF", unit="tensor", disable=not progress,
                  leave=False):
        name = mlx_name(t.name, model.arch)
        module, _, suffix = name.rpartition(".")
        n_heads = next((h for key, h in unpermute.items() if module.endswith(key)), None)
        is_norm = norm_offset and t.name.endswith("norm.weight")

        def fix(a, n_heads=n_heads, is_norm=is_norm):
            if is_norm:
                a = a - np.asarray(norm_offset, dtype=a.dtype)
            return unpermute_rows(a, n_heads) if n_heads else a

        kind = t.tensor_type.name
        if kind in NATIVE_BITS and suffix == "weight":
            parts = repack_native(np.asarray(t.data), kind)
            for part, arr in zip(("weight", "scales", "biases"), parts):
                out[f"{module}.{part}"] = mx.array(fix(arr))
        elif kind == "BF16":
            arr = fix(_float_tensor(t).astype(np.float32))
            out[name] = mx.array(arr).astype(mx.bfloat16)
        else:
            out[name] = mx.array(fix(_float_tensor(t)))
    return out


def is_gguf(path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
