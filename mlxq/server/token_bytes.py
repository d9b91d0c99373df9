"""The bytes one token stands for, for the ``bytes`` of OpenAI's logprobs.

A token may hold part of a multi-byte UTF-8 character (byte-level BPE splits many); its
decoding alone is then U+FFFD, but its bytes are exact, and a client joins the bytes of
consecutive tokens to get the character back. Read from the vocabulary's token strings
(``convert_ids_to_tokens``) for the two kinds mlx-lm's streaming detokenizers handle:
byte-level BPE (GPT-2's byte-to-character table) and SentencePiece (``<0xNN>`` byte
tokens, U+2581 for a space). Any other tokenizer: the UTF-8 of the token decoded alone.
"""

import functools

SPM_SPACE = "\u2581"


@functools.lru_cache(maxsize=1)
def _gpt2_char_to_byte() -> dict[str, int]:
    """GPT-2's table: printable bytes stand for themselves, the other 68 for characters
    from U+0100 on, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _tokenizer_kind(tokenizer) -> str:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    detokenizer = type(tokenizer.detokenizer)
    if issubclass(detokenizer, BPEStreamingDetokenizer):
        return "bpe"
    if issubclass(detokenizer, SPMStreamingDetokenizer):
        return "spm"
    return "other"


class TokenBytes:
    """``token_bytes(id) -> (text, bytes)``, cached per id: ``text`` the bytes decoded
    (U+FFFD for an incomplete character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = _tokenizer_kind(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        found = self._cache.get(token)
        if found is None:
            data = self._bytes(token)
            found = self._cache[token] = (data.decode("utf-8", errors="replace"), data)
        return found

    def _bytes(self, token: int) -> bytes:
        if self.kind == "other":
            return self.tokenizer.decode([token]).encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens([token])[0]
        if self.kind == "bpe":
            table = _gpt2_char_to_byte()
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8")
                            for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPM_SPACE, " ").encode("utf-8")
