"""One request's token logprobs, sent with the text that holds their tokens.

The scheduler sends text from mlx-lm's streaming detokenizer, which lags the tokens (a
byte-level BPE token's text appears once the next token starts a word), drops the first
token's leading space, and is held back or cut by stop strings. So a token's place in the
text is counted from the tokens' own bytes (``TokenBytes``), decoded incrementally as
UTF-8: token k spans ``[start, end)`` of those characters (to the end of a character it
holds only some bytes of), less the leading spaces the detokenizer dropped. Its entry
goes out once the text sent reaches ``end``; when a stop string ends the text, the tokens
reaching past it are dropped. For tokenizers other than
byte-level BPE and SentencePiece the count is approximate (a decoder that rewrites text,
e.g. cleans up spaces before punctuation, shifts it).
"""

import codecs
from collections import deque
from dataclasses import dataclass


@dataclass
class _Pending:
    token: int
    start: int  # characters of the tokens' decoded bytes before this token
    end: int | None  # None while the token ends inside a character
    logprob: float
    top: list  # [(id, logprob)], most likely first


def _leading_spaces(text: str) -> int:
    return len(text) - len(text.lstrip(" "))


class LogprobStream:
    def __init__(self, token_bytes):
        self.token_bytes = token_bytes  # TokenBytes: id -> (text, bytes)
        self._pending: deque[_Pending] = deque()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0
        self._head = ""  # the decoded tokens until one is not a space
        self._trim = None  # leading spaces the detokenizer dropped, once known
        self._open: list[_Pending] = []  # tokens ending inside the character being read

    def add(self, token: int, logprob: float, top: list) -> None:
        piece = self._decoder.decode(self.token_bytes(token)[1])
        start, self._chars = self._chars, self._chars + len(piece)
        if self._trim is None:
            self._head += piece
        p = _Pending(token, start, self._chars, logprob, top)
        if self._decoder.getstate()[0]:  # bytes of an unfinished character: it ends later
            p.end = None
            self._open.append(p)
        else:  # a character split across tokens belongs to each of them
            for q in self._open:
                q.end = self._chars
            self._open = []
        self._pending.append(p)

    def release(self, text: str, sent: int, final: bool = False, stopped: bool = False):
        """Entries of the tokens whose text is within ``text[:sent]`` (all, at the end of
        a text not cut by a stop string; none past ``sent`` when ``stopped``)."""
        if self._trim is None and text.strip(" "):
            self._trim = _leading_spaces(self._head) - _leading_spaces(text)
        release_all = final and not stopped
        trim = self._trim or 0
        out = []
        while self._pending:
            p = self._pending[0]
            sent_whole = self._trim is not None and p.end is not None and p.end - trim <= sent
            if not (release_all or sent_whole):
                break
            self._pending.popleft()
            token_text, data = self.token_bytes(p.token)
            out.append({"token": token_text, "bytes": list(data), "logprob": p.logprob,
                        "offset": max(0, p.start - trim),
                        "top": [(*self.token_bytes(i), lp) for i, lp in p.top]})
        if final or stopped:
            self._pending.clear()
        return out
