"""The OpenAI wire format: request validation and response objects.

Every field a request sends is checked here, before anything reaches the scheduler; a bad
one raises ``ApiError`` (HTTP 4xx with an OpenAI-style ``{"error": {...}}`` body). Field
values are only ever data: no field names a file, a model path or anything else the
server would open (``model`` must equal the served model's id).
"""

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 1000
MAX_TOP_LOGPROBS_CHAT = 20  # OpenAI's limits
MAX_LOGPROBS_LEGACY = 5
_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ServedModel:
    """What requests are checked against: the served model and its limits."""

    id: str
    aliases: tuple = ()
    context_length: int | None = None
    vocab_size: int = 0
    default_max_tokens: int = 512


@dataclass
class CompletionParams:
    """A validated request, ready for the scheduler."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    # Log-probabilities of the sampled tokens, with this many most likely alternatives.
    logprobs: bool = False
    top_logprobs: int = 0


# --- field checks -----------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _number(body, name, default, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(f"'{name}' must be a number, got {_json_type(v)}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        low = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise bad(f"'{name}' must be {low} and at most {hi}, got {v}", name)
    return float(v)


def _json_type(v) -> str:
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                    (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(v, t):
            return name
    return "null"


def _bool(body, name, default=False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_json_type(v)}", name)
    return v


def check_model(body, served: ServedModel) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise bad(f"'model' must be a string, got {_json_type(name)}", "model")
    if name != served.id and name not in served.aliases:
        raise ApiError(404, f"The model '{name[:200]}' does not exist; this server serves "
                            f"'{served.id}' (see GET /v1/models)",
                       param="model", code="model_not_found")


def _max_tokens(body, served: ServedModel) -> int:
    names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    if not names:
        return served.default_max_tokens
    name = names[0]
    v = body[name]
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, got {_json_type(v)}", name)
    if v < 1:
        raise bad(f"'{name}' must be at least 1, got {v}", name)
    limit = served.context_length or 2**31 - 1
    if v > limit:
        raise bad(f"'{name}' is {v} but the model's context is {limit} tokens", name)
    return v


def _stop(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"each 'stop' string must be at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s]


def _sampling(body, served, chat: bool, prompt_ids) -> CompletionParams:
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("only 'n': 1 is supported", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        v = body.get(name)
        if v is not None and not _is_number(v):
            raise bad(f"'{name}' must be a number, got {_json_type(v)}", name)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string", "user")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**64):
        raise bad("'seed' must be an integer from 0 to 2**64 - 1", "seed")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage")

    max_tokens = _max_tokens(body, served)
    ctx = served.context_length
    if ctx is not None:
        if len(prompt_ids) > ctx:
            raise bad(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                      f"{ctx} tokens", "messages" if chat else "prompt",
                      code="context_length_exceeded")
        # The last generated token is never fed back, hence + 1 (as mlxq.generate).
        max_tokens = min(max_tokens, ctx - len(prompt_ids) + 1)
    return CompletionParams(
        chat=chat, prompt_ids=prompt_ids, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed, stop=_stop(body), stream=stream, include_usage=include_usage,
        **_logprobs(body, chat),
    )


def _logprobs(body, chat: bool) -> dict:
    """Chat: ``logprobs`` a boolean, ``top_logprobs`` 0..20 (only with logprobs true).
    Completions (legacy): ``logprobs`` an integer 0..5, the number of alternatives."""
    top = body.get("top_logprobs")
    if not chat:
        if top is not None:
            raise bad("'top_logprobs' is a chat field; /v1/completions takes 'logprobs': an "
                      f"integer from 0 to {MAX_LOGPROBS_LEGACY}", "top_logprobs")
        n = body.get("logprobs")
        if n is None:
            return {}
        if not _is_int(n) or not 0 <= n <= MAX_LOGPROBS_LEGACY:
            raise bad(f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS_LEGACY}, got "
                      f"{json.dumps(n)[:50]}", "logprobs")
        return {"logprobs": True, "top_logprobs": n}
    want = _bool(body, "logprobs")
    if top is None:
        return {"logprobs": want}
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS_CHAT:
        raise bad(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS_CHAT}, got "
                  f"{json.dumps(top)[:50]}", "top_logprobs")
    if not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return {"logprobs": True, "top_logprobs": top}


def _require_object(body) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


# --- chat ------------------------------------------------------------------------------------
def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content: only text parts "
                          "({\"type\": \"text\", \"text\": ...}) are supported",
                          f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or an array of text parts",
              f"messages[{i}].content")


def chat_messages(body) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(_ROLES)}",
                      f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _message_text(m.get("content"), i)})
    return out


def parse_chat(body, served: ServedModel, encode_messages) -> CompletionParams:
    body = _require_object(body)
    check_model(body, served)
    messages = chat_messages(body)
    return _sampling(body, served, True, encode_messages(messages))


# --- completions ---------------------------------------------------------------------------
def _token_ids(ids, served: ServedModel) -> list[int]:
    if not ids or not all(_is_int(t) and 0 <= t < served.vocab_size for t in ids):
        raise bad(f"a prompt of token ids must be a non-empty array of integers from 0 to "
                  f"{served.vocab_size - 1}", "prompt")
    return list(ids)


def parse_completion(body, served: ServedModel, encode_text) -> CompletionParams:
    body = _require_object(body)
    check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty", "prompt")
        ids = encode_text(prompt)
    elif isinstance(prompt, list):
        ids = _token_ids(prompt, served)
    else:
        raise bad("'prompt' must be a string, an array of token ids, or an array with one "
                  "of those", "prompt")
    if body.get("echo") or body.get("suffix") or (body.get("best_of") not in (None, 1)):
        raise bad("'echo', 'suffix' and 'best_of' are not supported by this server")
    return _sampling(body, served, False, ids)


# --- responses -------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprobs_object(p: CompletionParams, entries: list[dict]) -> dict | None:
    """The choice's ``logprobs`` for these tokens (scheduler entries: ``token`` (text),
    ``bytes``, ``logprob``, ``offset`` in the completion text, ``top``: [(text, bytes,
    logprob)] best first); ``None`` when the request did not ask."""
    if not p.logprobs:
        return None
    if p.chat:
        return {"content": [
            {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(data)}
                              for t, data, lp in e["top"]]}
            for e in entries]}
    top = None
    if p.top_logprobs:  # a dict per token; two alternatives with one text keep the likelier
        top = [{t: lp for t, _, lp in reversed(e["top"])} for e in entries]
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": top, "text_offset": [e["offset"] for e in entries]}


def completion_object(p: CompletionParams, rid: str, model: str, text: str,
                      finish_reason: str, usage_: dict, entries: list[dict] = ()) -> dict:
    logprobs = logprobs_object(p, list(entries))
    if p.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": logprobs, "finish_reason": finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage_}


def chunk_object(p: CompletionParams, rid: str, model: str, text: str | None,
                 finish_reason: str | None, usage_: dict | None = None,
                 first: bool = False, entries: list[dict] | None = None) -> dict:
    """One streamed chunk; ``text=None`` with ``usage_`` is the final usage-only chunk;
    ``entries``: the logprobs of the tokens whose text this chunk carries."""
    logprobs = logprobs_object(p, entries) if entries else None
    if text is None and usage_ is not None:
        choices = []
    elif p.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        if finish_reason is not None and not text:
            delta = {}
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason}]
    obj = {"id": rid, "object": "chat.completion.chunk" if p.chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None or p.include_usage:
        obj["usage"] = usage_
    return obj
