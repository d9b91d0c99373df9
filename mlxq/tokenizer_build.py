"""Hugging Face tokenizer files from a GGUF's ``tokenizer.ggml.*`` metadata, without torch.

Two vocabulary kinds are supported:

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``): a ``tokenizers`` BPE model with the
  pre-tokenizer llama.cpp names in ``tokenizer.ggml.pre``;
- SentencePiece (``"llama"``: tokens + scores + token types, no merges; Llama 2, Mistral,
  Gemma): llama.cpp tokenizes these by repeatedly joining the adjacent pair whose joined
  piece is in the vocabulary with the best score. That is BPE with merges ranked by the
  joined piece's score, which is what we build, with byte fallback (``<0xXX>`` tokens),
  spaces spelled ``▁`` and the optional leading ``▁`` (``add_space_prefix``).

Control tokens (token_type 3) become special added tokens; user-defined ones (4, e.g.
Gemma's runs of spaces and newlines) are matched whole in the raw text, as llama.cpp does.
"""

import json
from pathlib import Path

from .errors import MlxqError

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPACE = "\u2581"  # SentencePiece's visible space
SUPPORTED_MODELS = ("gpt2", "llama")

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


def _bpe_tokenizer(meta: dict, tokens: list):
    from tokenizers import Tokenizer, decoders, models

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list, scores: list, types: list) -> list:
    """BPE merges equivalent to SentencePiece's best-score-first joining: every split of a
    normal token into two normal tokens, ranked by the joined token's score (ties: its
    position in the vocabulary), longer left piece first within one token."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_TYPE_NORMAL}
    ranked = sorted(normal.items(), key=lambda item: (-float(scores[item[1]]), item[1]))
    merges = []
    for token, _ in ranked:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def _spm_tokenizer(meta: dict, tokens: list, types: list):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise MlxqError("GGUF SentencePiece vocabulary has no scores for its tokens")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = _token(tokens, unk_id)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(
        vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
        fuse_unk=True, byte_fallback=True,
    ))
    # llama.cpp escapes spaces as ▁ and, when add_space_prefix is set, prepends one.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    # The exact decoder shapes mlx-lm recognises for its SentencePiece streaming detokenizer.
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def write_tokenizer_files(meta: dict, folder: Path, model_max_length: int | None = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    ``meta`` maps GGUF keys to values. Returns the special token ids
    (``bos_token_id``, ``eos_token_id``, ...) for config.json.
    """
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise MlxqError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: byte-level BPE "
            "('gpt2') and SentencePiece ('llama') vocabularies"
        )
    if not meta.get("tokenizer.ggml.tokens"):
        raise MlxqError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = _bpe_tokenizer(meta, tokens) if kind == "gpt2" else _spm_tokenizer(meta, tokens, types)

    ids = {
        name: meta.get(f"tokenizer.ggml.{name}_token_id")
        for name in ("bos", "eos", "unknown", "padding")
    }
    bos = _token(tokens, ids["bos"])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    post = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if add_bos:
        bos_id = int(ids["bos"])
        post.append(processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        ))
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)

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
