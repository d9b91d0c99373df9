"""Continuous batching: one thread runs every model computation of the server.

Requests wait in a FIFO queue until the KV memory they may need fits under
``--max-kv-memory`` (next to what the running requests reserved and the prefix cache
holds) and a slot among ``--decode-concurrency`` is free; a full queue is answered
HTTP 503 with Retry-After. Each iteration of the loop then

1. drops requests whose client went away (their caches are freed at once),
2. admits waiting requests (taking the longest cached prefix from the prefix cache),
3. feeds ONE prefill chunk of the oldest request still reading its prompt, so a long new
   prompt costs the running streams one chunk's delay per token, not the whole prompt,
4. runs ``BatchDecoder.step`` over every request that is generating: one new token each.

``BatchDecoder.step(sequences) -> tokens`` is the one boundary of a batched decode step.
Today it runs one forward per sequence, each over its own per-layer caches (the int4
cache as it exists), and evaluates all of them together in a single ``mx.eval``. The next
step is a single forward of the (B, 1) batch through the fused int4 kernel inside this
class: main's ``mlxq.batch_cache.BatchQuantizedKVCache`` (sequences join with ``extend``
after their own prefill, leave with ``filter``, per-sequence ``offset`` for RoPE) is that
batched cache; nothing else in the server changes. Numerically a request's tokens do not
depend on what else runs: its prefill chunks start at fixed positions and its decode
graph is its own, so at temperature 0 a request in a batch returns exactly what it
returns alone.
"""

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from ..backend import compute_dtype
from ..cache import make_cache
from ..generate import next_token, prefill_chunks
from ..prompt_cache import PromptCache
from ..sampling import make_sampler
from .protocol import ApiError, CompletionParams, usage

def kv_bytes_needed(model, kv_options: dict, tokens: int, prefill_step: int) -> int:
    """An upper bound on the KV-cache bytes of one sequence of ``tokens`` tokens with these
    KV options: buffers grow in whole ``step`` blocks; a quantized cache holds one packed
    row per token plus at most ``sink + recent`` float16 slots (mlxq/quantized_cache.py)."""
    from ..cache import config_from_options

    config = config_from_options(**kv_options)
    layers = len(model.layers)
    heads, head_dim = model.n_kv_heads, model.head_dim
    blocks = -(-max(tokens, 1) // config.step) * config.step
    if not config.quantized:
        per_token = 2 * heads * head_dim * mx.zeros((), compute_dtype()).itemsize
        return layers * blocks * per_token
    from ..kernels.kv_layout import row_bytes

    fp_slots = min(config.sink + config.recent, tokens + prefill_step)
    return layers * heads * (blocks * row_bytes(head_dim, config.bits, config.group_size)
                             + fp_slots * 2 * head_dim * 2)


@dataclass
class Sequence:
    """One request inside the scheduler."""

    id: int
    params: CompletionParams
    emit: object  # callable(event dict), safe to call from the scheduler thread
    reserved: int
    caches: list = None
    cached_tokens: int = 0
    prefill: object = None  # prefill_chunks generator while reading the prompt
    prefilled: int = 0
    last: object = None  # mx.array (1,): the token the next decode step feeds
    sampler: object = None
    detokenizer: object = None
    sampled: list = field(default_factory=list)  # every sampled id, EOS included
    completion_tokens: int = 0
    emitted: int = 0  # characters of the detokenized text already sent
    cancelled: bool = False

    @property
    def decoding(self) -> bool:
        return self.prefill is None


class BatchDecoder:
    """One decode step for a set of sequences: feed each its last token, sample the next.

    Now: a forward per sequence over its own caches, all evaluated in one ``mx.eval``.
    Next: one (B, 1) forward over a ``BatchQuantizedKVCache`` per layer (the fused decode
    kernel with per-sequence lengths) -- same signature.
    """

    def __init__(self, model):
        self.model = model

    def step(self, sequences) -> list[int]:
        ys = [next_token(self.model, s.last, s.caches, s.sampler) for s in sequences]
        mx.eval(ys)
        return [y.item() for y in ys]


class Scheduler:
    def __init__(self, model, tokenizer, kv_options: dict, prefix_cache, *,
                 decode_concurrency: int = 32, max_kv_bytes: int, max_waiting: int = 64,
                 prefill_step_size: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_options = kv_options
        self.prefix_cache = prefix_cache
        self.decode_concurrency = decode_concurrency
        self.max_kv_bytes = max_kv_bytes
        self.max_waiting = max_waiting
        self.prefill_step_size = prefill_step_size
        self.decoder = BatchDecoder(model)
        self.eos = set(tokenizer.eos_token_ids)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[int] = set()
        self._active: list[Sequence] = []
        self._reserved = 0
        self._stopping = False
        self._thread = None
        self._stats = {"requests_finished": 0, "requests_cancelled": 0, "peak_batch": 0}
        self._update_stats()

    # --- called from the HTTP side ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlxq-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, params: CompletionParams, emit) -> int:
        """Queue a request; ``emit(event)`` gets {"type": "text"|"done"|"error", ...}."""
        need = kv_bytes_needed(self.model, self.kv_options,
                               len(params.prompt_ids) + params.max_tokens,
                               self.prefill_step_size)
        if need > self.max_kv_bytes:
            raise ApiError(
                400, f"this request may need {need / 1e6:.1f} MB of KV cache, more than the "
                     f"server's --max-kv-memory of {self.max_kv_bytes / 1e6:.1f} MB; send a "
                     "shorter prompt or a lower max_tokens", code="kv_memory_exceeded")
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            if len(self._waiting) >= self.max_waiting and not self._can_admit_now(need):
                raise ApiError(503, "the server is busy: all KV memory and queue slots are "
                                    "taken; retry shortly", type="server_busy",
                               headers={"Retry-After": "1"})
            seq = Sequence(next(self._ids), params, emit, need)
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """The client went away: free the request's slot and memory (idempotent)."""
        with self._cond:
            self._cancelled.add(seq_id)
            self._cond.notify_all()

    def stats(self) -> dict:
        return dict(self._stats)

    # --- the loop (scheduler thread only) ----------------------------------------------------
    def _can_admit_now(self, need: int) -> bool:
        return (len(self._active) < self.decode_concurrency and not self._waiting
                and self._reserved + need <= self.max_kv_bytes)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active
                           or self._cancelled):
                    self._cond.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                self._waiting = deque(s for s in self._waiting if s.id not in cancelled)
            try:
                self._iteration(cancelled)
            except Exception as e:  # noqa: BLE001 - a model error fails its requests only
                traceback.print_exc()
                for s in list(self._active):
                    self._fail(s, f"internal error: {type(e).__name__}: {e}")
            self._update_stats()
        for s in list(self._active) + list(self._waiting):
            self._fail(s, "the server is shutting down")

    def _iteration(self, cancelled: set) -> None:
        for s in [s for s in self._active if s.id in cancelled]:
            self._remove(s)
            self._stats["requests_cancelled"] += 1
        self._admit()
        prefilling = [s for s in self._active if not s.decoding]
        if prefilling:
            self._prefill_chunk(prefilling[0])
        decoding = [s for s in self._active if s.decoding]
        if decoding:
            self._stats["peak_batch"] = max(self._stats["peak_batch"], len(decoding))
            for s, token in zip(decoding, self.decoder.step(decoding)):
                self._advance(s, token)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.decode_concurrency:
            with self._cond:
                seq = self._waiting[0]
                free = self.max_kv_bytes - self._reserved
                if seq.reserved > free - self.prefix_cache.nbytes:
                    # Cached prefixes give way to live requests.
                    self.prefix_cache.shrink(max(0, free - seq.reserved))
                if seq.reserved > free - self.prefix_cache.nbytes:
                    return  # waits until running requests finish
                self._waiting.popleft()
                self._reserved += seq.reserved
            self._active.append(seq)  # first, so a failure below is cleaned up by _fail
            self._start(seq)

    def _start(self, s: Sequence) -> None:
        p = s.params
        prompt_cache = self.prefix_cache.lookup(p.prompt_ids)
        if prompt_cache is not None:
            s.caches, s.cached_tokens = prompt_cache.caches, len(prompt_cache.tokens)
        else:
            s.caches = make_cache(self.model, **self.kv_options)
        s.prefilled = s.cached_tokens
        s.sampler = make_sampler(p.temperature, p.top_p, p.seed)
        s.detokenizer = self.tokenizer.detokenizer
        s.last = mx.array(p.prompt_ids[-1:])
        if len(p.prompt_ids) - 1 > s.prefilled:
            s.prefill = prefill_chunks(self.model, p.prompt_ids, s.caches,
                                       self.prefill_step_size, s.prefilled)

    def _prefill_chunk(self, s: Sequence) -> None:
        s.prefilled += next(s.prefill)
        if s.prefilled >= len(s.params.prompt_ids) - 1:
            s.prefill.close()
            s.prefill = None

    def _advance(self, s: Sequence, token: int) -> None:
        s.sampled.append(token)
        if token in self.eos:
            self._finish(s, "stop")
            return
        s.completion_tokens += 1
        s.last = mx.array([token])
        s.detokenizer.add_token(token)
        if self._send_text(s, s.detokenizer.text, final=False):
            self._finish(s, "stop", flush=False)
        elif s.completion_tokens >= s.params.max_tokens:
            self._finish(s, "length")

    def _send_text(self, s: Sequence, text: str, final: bool) -> bool:
        """Send the new text up to any stop string; True if a stop string was found.
        Text that could be the start of a stop string is held back until it is not."""
        stops = s.params.stop
        end = len(text)
        hit = False
        if stops:
            search_from = max(0, s.emitted - max(map(len, stops)) + 1)
            found = [i for i in (text.find(stop, search_from) for stop in stops) if i >= 0]
            if found:
                end, hit = min(found), True
            elif not final:
                end -= max((k for stop in stops for k in range(1, len(stop))
                            if text.endswith(stop[:k])), default=0)
        if end > s.emitted:
            s.emit({"type": "text", "text": text[s.emitted:end]})
            s.emitted = end
        return hit

    def _finish(self, s: Sequence, reason: str, flush: bool = True) -> None:
        if flush:
            s.detokenizer.finalize()
            if self._send_text(s, s.detokenizer.text, final=True):
                reason = "stop"
        s.emit({"type": "done", "finish_reason": reason,
                "usage": usage(len(s.params.prompt_ids), s.completion_tokens,
                               s.cached_tokens)})
        self._stats["requests_finished"] += 1
        self._remove(s, keep_prefix=True)

    def _fail(self, s: Sequence, message: str) -> None:
        s.emit({"type": "error", "message": message})
        if s in self._active:
            self._remove(s)

    def _remove(self, s: Sequence, keep_prefix: bool = False) -> None:
        self._active.remove(s)
        with self._cond:
            self._reserved -= s.reserved
        caches, s.caches = s.caches, None
        if s.prefill is not None:
            s.prefill.close()
            s.prefill = None
        if keep_prefix and caches:
            # The caches hold the prompt and every sampled token but the last.
            tokens = (s.params.prompt_ids + s.sampled)[:caches[0].offset]
            self.prefix_cache.insert(PromptCache(caches, tokens))
        del caches
        if not self._active:
            mx.clear_cache()  # give the allocator's free buffers back when idle

    def _update_stats(self) -> None:
        self._stats.update({
            "active": len(self._active),
            "waiting": len(self._waiting),
            "kv_reserved_bytes": self._reserved,
            "kv_active_bytes": sum(sum(c.nbytes for c in s.caches) for s in self._active
                                   if s.caches),
            "prefix_cache_entries": len(self.prefix_cache),
            "prefix_cache_bytes": self.prefix_cache.nbytes,
            "mlx_active_memory": mx.get_active_memory(),
            "time": time.time(),
        })
