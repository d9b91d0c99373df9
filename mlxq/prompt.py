"""A prompt -> token ids the model can take: text (through the chat template, if any)
or ids, checked so that bad input is one MlxqError, never a crash in native code or a
tokenizers traceback (text that is not UTF-8, ids outside the embedding)."""

import contextlib
import operator
import sys

from .errors import MlxqError


@contextlib.contextmanager
def _quiet_transformers():
    # transformers warns on stderr when a text exceeds model_max_length; we check the
    # context ourselves and report it as one clear error instead.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def encode_prompt(tokenizer, prompt, system=None, chat_template=True) -> list[int]:
    """Token ids of ``prompt`` (text, wrapped in the chat template if there is one, or ids)."""
    if isinstance(prompt, str):
        for what, text in (("prompt", prompt), ("system message", system)):
            if text is not None and not isinstance(text, str):
                raise MlxqError(f"the {what} must be text, got {type(text).__name__}")
            if text is not None and not is_utf8_text(text):
                raise MlxqError(f"the {what} is not valid UTF-8 text")
        with _quiet_transformers():
            return _encode_text(tokenizer, prompt, system, chat_template)
    if isinstance(prompt, (bytes, bytearray)) or prompt is None:
        raise MlxqError("the prompt must be text or a list of integer token ids, got "
                        f"{type(prompt).__name__}")
    try:
        ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        return [operator.index(t) for t in ids]  # ints, numpy ints; not floats
    except TypeError:
        raise MlxqError("a prompt given as tokens must be a list of integer ids") from None


def is_utf8_text(text: str) -> bool:
    """False for text holding lone surrogates: what Python makes of bytes that are not
    UTF-8 in argv (and tokenizers cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_prompt_stdin() -> str:
    """stdin as UTF-8 text (one clear error otherwise, not a decoding traceback)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in place by a caller (tests, notebooks)
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxqError(f"the prompt on stdin is not UTF-8 text (byte {e.start}: "
                        f"{data[e.start:e.start + 1]!r})") from None


def vocab_size(model) -> int | None:
    """Rows of the model's embedding, as its config says (None: unknown)."""
    value = getattr(getattr(model, "args", None), "vocab_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_token_ids(ids: list[int], model, from_text: bool) -> None:
    """Every id must index the embedding: one outside reads out of bounds in native code
    (a crash, or silently wrong output)."""
    n = vocab_size(model)
    if n is None:
        return
    bad = next((t for t in ids if not 0 <= t < n), None)
    if bad is None:
        return
    if from_text:
        raise MlxqError(f"the tokenizer produced token id {bad}, outside the model's "
                        f"vocabulary of {n} tokens: the tokenizer does not fit this model")
    raise MlxqError(f"token id {bad} is outside the model's vocabulary [0, {n})")


def _encode_text(tokenizer, prompt, system, chat_template):
    if chat_template and getattr(tokenizer, "has_chat_template", False):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # template code may raise anything (jinja2, raise_exception)
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise MlxqError(f"the model's chat template fails on this prompt ({first}); "
                            "feed the prompt as plain text (--ignore-chat-template / "
                            "chat_template=False)") from None
        return list(ids)
    if system:
        prompt = f"{system}\n\n{prompt}"
    # Add BOS etc. unless the text already starts with it.
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos))))
