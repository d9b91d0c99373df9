"""The tokenizer files of a model folder checked before they are trusted: every JSON
settings file must be a readable JSON object, tokenizer.json a valid ``tokenizers`` file,
and the vocabulary must fit the model's embedding (a larger tokenizer would produce ids
that index past the embedding: a crash in native code, or silent garbage)."""

from pathlib import Path

from .errors import MlxqError
from .model_folder import read_json_object

# Settings files convert copies and transformers / mlx-lm read.
JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "generation_config.json", "chat_template.json", "vocab.json")


def tokenizer_vocab_size(folder: Path) -> int | None:
    """Tokens of the tokenizer's vocabulary (without added tokens), if the folder says."""
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.exists():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust parser raises plain Exceptions
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise MlxqError(f"{tokenizer_json} is not a valid tokenizer file ({first})") from None
        return tok.get_vocab_size(with_added_tokens=False)
    if (folder / "vocab.json").exists():
        return len(read_json_object(folder / "vocab.json"))
    return None  # tokenizer.model (SentencePiece): ids are checked at generation


def check_tokenizer_files(folder: Path, vocab_size) -> None:
    """One MlxqError for a broken settings file or a tokenizer larger than ``vocab_size``
    (the model's embedding rows; None: unknown, not checked)."""
    folder = Path(folder)
    for name in JSON_FILES:
        if (folder / name).exists():
            read_json_object(folder / name)
    n = tokenizer_vocab_size(folder)
    if n is not None and isinstance(vocab_size, int) and n > vocab_size:
        raise MlxqError(f"the tokenizer in {folder} has {n} tokens but the model's embedding "
                        f"has only {vocab_size} (vocab_size in config.json): they do not "
                        "belong together")
