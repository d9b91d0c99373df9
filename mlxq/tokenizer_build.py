"""Hugging Face tokenizer files from a GGUF's ``tokenizer.ggml.*`` metadata, without torch.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported: they
become a ``tokenizers`` BPE model with the pre-tokenizer llama.cpp names in
``tokenizer.ggml.pre``. Control tokens (token_type 3) become special added tokens.
"""

import json
from pathlib import Path

from .errors import MlxqError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE = ("default", "gpt2", "smollm", "starcoder", "llama-bpe", "llama3", "qwen2")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in ("default", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder"):
        # llama.cpp: split every digit, then the GPT-2 regex (= HF's Digits + ByteLevel).
        return pt.Sequence([
            pt.Digits(individual_digits=True),
            pt.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        regex = _QWEN2 if pre == "qwen2" else _LLAMA3
        return pt.Sequence([
            pt.Split(Regex(regex), behavior="isolated", invert=False),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise MlxqError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE)}"
    )


def _token(tokens, idx):
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def write_tokenizer_files(meta: dict, folder: Path, model_max_length: int | None = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    ``meta`` maps GGUF keys to values. Returns the special token ids
    (``bos_token_id``, ``eos_token_id``, ...) for config.json.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MlxqError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') "
            "vocabularies can be converted"
        )
    if not meta.get("tokenizer.ggml.tokens"):
        raise MlxqError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()

    ids = {
        name: meta.get(f"tokenizer.ggml.{name}_token_id")
        for name in ("bos", "eos", "unknown", "padding")
    }
    bos = _token(tokens, ids["bos"])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos_id = int(ids["bos"])
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level

    # Control tokens must never be split by BPE and are skipped when decoding specials.
    def added(kind, special):
        return [
            AddedToken(t, special=special, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == kind
        ]

    tok.add_special_tokens(added(TOKEN_TYPE_CONTROL, True))
    tok.add_tokens(added(TOKEN_TYPE_USER_DEFINED, False))
    tok.save(str(folder / "tokenizer.json"))

    special = {
        "bos_token": bos,
        "eos_token": _token(tokens, ids["eos"]),
        "unk_token": _token(tokens, ids["unknown"]),
        "pad_token": _token(tokens, ids["padding"]),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    if model_max_length:
        tok_config["model_max_length"] = int(model_max_length)
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))

    config_ids = {
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
    }
    return {k: int(v) for k, v in config_ids.items() if v is not None}
