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

``BatchDecoder.step(sequences) -> [(token, logprobs)]`` is the one boundary of a decode
step (``logprobs`` only for requests that asked: the log-softmax is computed for their
rows alone; ``LogprobStream`` sends them with the text). On mlxq's own models it keeps a
running batch: per layer one batched cache from
``mlxq.batch_cache`` (``BatchQuantizedKVCache`` for int4/int8, ``BatchKVCache`` for
``--kv-bits 16``), which a sequence joins (``extend``) once its own prefill is done and
leaves (``filter``, after ``extract`` of its caches for the prefix cache) when it
finishes, fails or its client goes away. A step is then ONE (B, 1) forward of every
generating sequence, each at its own length (int4: the fused kernel with per-sequence
lengths); each row is sampled by its request's own sampler. Models from the mlx-lm
bridge (``decodes_as_one_batch`` says why) run one forward per sequence over its own
caches, evaluated together.

Memory: the batch pads every sequence's store to the longest one's rows, so the running
requests are reserved ``BatchDecoder.kv_bytes`` (the padded batch), not the sum of their
own caches. At temperature 0 a request's tokens do not depend on what else runs beyond
float rounding: its prefill chunks start at fixed positions and its row of a batched step
is computed as it would be alone, up to the summation order of a (B, ·) matmul (the
16-stream test compares every answer with the same request sent alone).
"""

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx

from ..backend import compute_dtype
from ..batch_cache import BatchKVCache, BatchQuantizedKVCache, batch_nbytes, full_precision_nbytes
from ..cache import config_from_options, make_cache
from ..generate import prefill_chunks
from ..prompt_cache import PromptCache
from ..quantized_cache import quantized_nbytes
from ..sampling import make_sampler
from .protocol import ApiError, CompletionParams, usage
from .logprob_stream import LogprobStream
from .token_bytes import TokenBytes


def kv_bytes_needed(model, kv_options: dict, tokens: int) -> int:
    """The KV-cache bytes one sequence of up to ``tokens`` tokens allocates in its own
    caches with these KV options (buffers grow in whole blocks)."""
    config = config_from_options(**kv_options)
    layers, heads, head_dim = len(model.layers), model.n_kv_heads, model.head_dim
    if config.quantized:
        return layers * quantized_nbytes(config, heads, head_dim, tokens)
    return layers * full_precision_nbytes(config.step, heads, head_dim, _itemsize(), 1, tokens)


def _itemsize() -> int:
    return mx.zeros((), compute_dtype()).itemsize


def decodes_as_one_batch(model) -> bool:
    """Whether a decode step runs every sequence through ONE (B, 1) forward over a batched
    cache per layer (``BatchQuantizedKVCache``, or ``BatchKVCache`` for ``--kv-bits 16``);
    if not, one forward per sequence over its own caches. The one place that decides.

    mlxq's own models (mlxq/models) batch: they hand the batch's per-sequence offsets (an
    array) to ``mx.fast.rope``, which takes it, and attend through ``mlxq.attention``.
    Models built by the mlx-lm bridge (mlxq/mlx_lm_bridge.py) do not: their layers see
    the caches through views and masks made for one sequence at one integer offset, and
    sliding-window layers keep mlx-lm's own caches.
    """
    from ..models.transformer import Model

    return isinstance(model, Model)


def token_logprobs(logits, token, top: int) -> tuple:
    """Lazy: the log-probability of ``token`` under the model's own distribution (the
    log-softmax of ``logits`` (1, vocab), before temperature and top-p, as OpenAI reports
    it) and the ``top`` most likely ids with theirs (unordered)."""
    logprobs = logits[0].astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs)
    chosen = logprobs[token[0]]
    if top == 0:
        return chosen, None, None
    ids = mx.argpartition(-logprobs, top - 1)[:top]
    return chosen, ids, logprobs[ids]


def _to_python(arrays) -> dict:
    """``{"logprob": float, "top": [(id, logprob)] most likely first}``."""
    chosen, ids, values = arrays
    top = [] if ids is None else sorted(zip(ids.tolist(), values.tolist()),
                                        key=lambda t: -t[1])
    return {"logprob": chosen.item(), "top": top}


@dataclass(eq=False)  # compared by identity: the decoder keeps them in its batch
class Sequence:
    """One request inside the scheduler."""

    id: int
    params: CompletionParams
    emit: object  # callable(event dict), safe to call from the scheduler thread
    caches: list = None  # its own per-layer caches, until it joins the decode batch
    cached_tokens: int = 0
    prefill: object = None  # prefill_chunks generator while reading the prompt
    prefilled: int = 0
    last: object = None  # mx.array (1,): the token the next decode step feeds
    sampler: object = None
    detokenizer: object = None
    sampled: list = field(default_factory=list)  # every sampled id, EOS included
    completion_tokens: int = 0
    emitted: int = 0  # characters of the detokenized text already sent
    logprob_stream: object = None  # LogprobStream, when the request asked for logprobs
    cancelled: bool = False

    @property
    def decoding(self) -> bool:
        return self.prefill is None

    @property
    def kv_tokens(self) -> int:
        """The most tokens its cache may hold: what its KV memory is reserved for."""
        return len(self.params.prompt_ids) + self.params.max_tokens


class BatchDecoder:
    """One decode step for a set of sequences: feed each its last token, sample the next.

    Batched (``decodes_as_one_batch``): ``rows`` are the sequences of the running batch
    and ``caches`` its per-layer batched caches; a step first makes the batch
    exactly the given sequences (newcomers join, anything else leaves), then runs one
    forward. Otherwise one forward per sequence over ``Sequence.caches``.
    """

    def __init__(self, model, kv_options: dict):
        self.model = model
        self.kv_options = kv_options
        self.config = config_from_options(**kv_options)
        self.batched = decodes_as_one_batch(model)
        self.batch_class = BatchQuantizedKVCache if self.config.quantized else BatchKVCache
        self.rows: list[Sequence] = []
        self.caches: list | None = None
        self.forwards = 0  # model calls made by decode steps (a count the tests read)

    def step(self, sequences) -> list[tuple[int, dict | None]]:
        """One new token per sequence, each with its log-probabilities (``token_logprobs``)
        when its request asked for them, else None."""
        if not self.batched:
            logits = {s: self._forward_alone(s) for s in sequences}
            self.forwards += len(sequences)
        else:
            # A one-token prompt has no cache yet to join with: its first step runs alone.
            empty = [s for s in sequences if s not in self.rows and s.caches[0].offset == 0]
            logits = {s: self._forward_alone(s) for s in empty}
            for s in [s for s in self.rows if s not in sequences]:
                self.leave(s)
            self._join([s for s in sequences if s not in self.rows and s not in logits])
            if self.rows:
                tokens = mx.concatenate([s.last for s in self.rows])[:, None]
                batch = self.model(tokens, cache=self.caches)[:, -1, :]
                logits.update({s: batch[i:i + 1] for i, s in enumerate(self.rows)})
            self.forwards += len(empty) + bool(self.rows)
        ys = {s: s.sampler(logits[s]) for s in sequences}
        # Only rows whose request asked pay for the log-softmax (and top-k) of their logits.
        extra = {s: token_logprobs(logits[s], ys[s], s.params.top_logprobs)
                 for s in sequences if s.params is not None and s.params.logprobs}
        mx.eval(list(ys.values()), list(extra.values()))
        return [(ys[s].item(), _to_python(extra[s]) if s in extra else None)
                for s in sequences]

    def _forward_alone(self, s: Sequence):
        return self.model(s.last[None], cache=s.caches)[:, -1, :]

    def _join(self, newcomers) -> None:
        """Prefilled sequences join the batch; their own caches are handed over."""
        if not newcomers:
            return
        for i in range(len(self.model.layers)):
            joining = self.batch_class([s.caches[i] for s in newcomers])
            for s in newcomers:
                s.caches[i] = None
            if self.caches is None:
                self.caches = [None] * len(self.model.layers)
            if self.caches[i] is None:
                self.caches[i] = joining
            else:
                self.caches[i].extend(joining)
            # Layer by layer: the old buffers go before the next layer is copied.
            mx.eval(self.caches[i].state)
        for s in newcomers:
            s.caches = None
        self.rows += newcomers

    def leave(self, s: Sequence, keep_cache: bool = False) -> list | None:
        """``s`` is done: its per-layer caches (its own, or taken out of the batch when
        ``keep_cache``), and its batch row freed."""
        if s not in self.rows:
            caches, s.caches = s.caches, None
            return caches
        i = self.rows.index(s)
        caches = None
        if keep_cache:  # evaluated now: a lazy copy would keep the whole batch alive
            caches = [layer.extract(i) for layer in self.caches]
            mx.eval([c.state for c in caches])
        del self.rows[i]
        if not self.rows:
            self.caches = None
            return caches
        keep = [j for j in range(len(self.rows) + 1) if j != i]
        for layer in self.caches:
            layer.filter(keep)
            mx.eval(layer.state)
        return caches

    def kv_bytes(self, token_counts: list[int]) -> int:
        """The KV bytes sequences that may hold these many tokens need together: the
        padded batch (every row as long as the longest) or their own caches."""
        if not token_counts:
            return 0
        if self.batched:
            layers, heads, dim = len(self.model.layers), self.model.n_kv_heads, self.model.head_dim
            B, longest = len(token_counts), max(token_counts)
            if self.config.quantized:
                return layers * batch_nbytes(self.config, heads, dim, B, longest)
            return layers * full_precision_nbytes(self.config.step, heads, dim, _itemsize(),
                                                  B, longest)
        return sum(kv_bytes_needed(self.model, self.kv_options, n) for n in token_counts)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches) if self.caches else 0


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
        self.decoder = BatchDecoder(model, kv_options)
        self.eos = set(tokenizer.eos_token_ids)
        self.token_bytes = TokenBytes(tokenizer)  # a token's text and bytes, for logprobs
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[int] = set()
        self._active: list[Sequence] = []
        self._reserved = 0
        self._stopping = False
        self._thread = None
        self._stats = {"requests_finished": 0, "requests_cancelled": 0, "peak_batch": 0,
                       "decode_steps": 0}
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
        tokens = len(params.prompt_ids) + params.max_tokens
        need = self.decoder.kv_bytes([tokens])
        if need > self.max_kv_bytes:
            raise ApiError(
                400, f"this request may need {need / 1e6:.1f} MB of KV cache, more than the "
                     f"server's --max-kv-memory of {self.max_kv_bytes / 1e6:.1f} MB; send a "
                     "shorter prompt or a lower max_tokens", code="kv_memory_exceeded")
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            if len(self._waiting) >= self.max_waiting and not self._can_admit_now(tokens):
                raise ApiError(503, "the server is busy: all KV memory and queue slots are "
                                    "taken; retry shortly", type="server_busy",
                               headers={"Retry-After": "1"})
            seq = Sequence(next(self._ids), params, emit)
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """The client went away: free the request's slot and memory (idempotent)."""
        with self._cond:
            self._cancelled.add(seq_id)
            self._cond.notify_all()

    def stats(self) -> dict:
        """The loop's counters, with the queue and reservation read now: a request just
        submitted or cancelled is not idle yet (an iteration may not have run). ``active``
        falls only when the iteration that removed a request publishes its counters and
        bytes, so an idle reading never comes with the previous iteration's figures."""
        with self._cond:
            return {**self._stats, "waiting": len(self._waiting),
                    "kv_reserved_bytes": self._reserved,
                    "active": max(len(self._active), self._stats["active"])}

    # --- the loop (scheduler thread only) ----------------------------------------------------
    def _reservation(self, sequences) -> int:
        """KV bytes reserved for these sequences running together."""
        return self.decoder.kv_bytes([s.kv_tokens for s in sequences])

    def _can_admit_now(self, tokens: int) -> bool:
        active = list(self._active)  # a snapshot: the scheduler thread changes the list
        return (len(active) < self.decode_concurrency and not self._waiting
                and self.decoder.kv_bytes([s.kv_tokens for s in active] + [tokens])
                <= self.max_kv_bytes)

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
            self._stats["decode_steps"] += 1
            for s, (token, logprobs) in zip(decoding, self.decoder.step(decoding)):
                self._advance(s, token, logprobs)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.decode_concurrency:
            with self._cond:
                seq = self._waiting[0]
                reserved = self._reservation(self._active + [seq])
                free = self.max_kv_bytes - reserved
                if free < self.prefix_cache.nbytes:
                    # Cached prefixes give way to live requests.
                    self.prefix_cache.shrink(max(0, free))
                if free < self.prefix_cache.nbytes:
                    return  # waits until running requests finish
                self._waiting.popleft()
                self._reserved = reserved
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
        if p.logprobs:
            s.logprob_stream = LogprobStream(self.token_bytes)
        s.last = mx.array(p.prompt_ids[-1:])
        if len(p.prompt_ids) - 1 > s.prefilled:
            s.prefill = prefill_chunks(self.model, p.prompt_ids, s.caches,
                                       self.prefill_step_size, s.prefilled)

    def _prefill_chunk(self, s: Sequence) -> None:
        s.prefilled += next(s.prefill)
        if s.prefilled >= len(s.params.prompt_ids) - 1:
            s.prefill.close()
            s.prefill = None

    def _advance(self, s: Sequence, token: int, logprobs: dict | None = None) -> None:
        s.sampled.append(token)
        if token in self.eos:  # not part of the text: no logprobs entry either
            self._finish(s, "stop")
            return
        s.completion_tokens += 1
        s.last = mx.array([token])
        s.detokenizer.add_token(token)
        if logprobs is not None:
            s.logprob_stream.add(token, **logprobs)
        if self._send_text(s, s.detokenizer.text, final=False):
            self._finish(s, "stop", flush=False)
        elif s.completion_tokens >= s.params.max_tokens:
            self._finish(s, "length")

    def _send_text(self, s: Sequence, text: str, final: bool) -> bool:
        """Send the new text up to any stop string; True if a stop string was found.
        Text that could be the start of a stop string is held back until it is not.
        With it go the logprobs of the tokens whose text it completes."""
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
        new = text[s.emitted:end] if end > s.emitted else ""
        s.emitted += len(new)
        entries = []
        if s.logprob_stream is not None:
            entries = s.logprob_stream.release(text, s.emitted, final=final, stopped=hit)
        if new or entries:
            event = {"type": "text", "text": new}
            if s.logprob_stream is not None:
                event["logprobs"] = entries
            s.emit(event)
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
            self._reserved = self._reservation(self._active)
        caches = self.decoder.leave(s, keep_cache=keep_prefix)
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
            "kv_active_bytes": self.decoder.nbytes + sum(
                sum(c.nbytes for c in s.caches) for s in self._active if s.caches),
            "batch": len(self.decoder.rows),
            "decode_forwards": self.decoder.forwards,
            "prefix_cache_entries": len(self.prefix_cache),
            "prefix_cache_bytes": self.prefix_cache.nbytes,
            "mlx_active_memory": mx.get_active_memory(),
            "time": time.time(),
        })
