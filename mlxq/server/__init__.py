"""``python -m mlxq.server``: an OpenAI-compatible HTTP server over one mlxq model.

Modules: ``protocol`` (request validation, response objects), ``app`` (Starlette routes,
server-sent events), ``scheduler`` (continuous batching, memory admission, the
``BatchDecoder`` step), ``prefix_cache`` (reuse of earlier conversations' KV caches),
``token_bytes`` (a token's exact bytes) and ``logprob_stream`` (a request's token
logprobs, sent with the text that holds their tokens).
"""

from .app import Server
from .prefix_cache import PrefixCache
from .protocol import ServedModel
from .scheduler import Scheduler

DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512
DEFAULT_DECODE_CONCURRENCY = 32
DEFAULT_PROMPT_CACHE_SIZE = 10
# Of the machine's memory, what KV caches may take by default (the rest: weights,
# activations, the OS and other programs).
DEFAULT_KV_MEMORY_FRACTION = 0.4


def create_server(model, tokenizer, model_id: str, *, kv_options: dict | None = None,
                  max_kv_bytes: int, prompt_cache_bytes: int | None = None,
                  prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
                  decode_concurrency: int = DEFAULT_DECODE_CONCURRENCY,
                  max_tokens: int = DEFAULT_MAX_TOKENS, max_waiting: int = 64,
                  prefill_step_size: int = 512, aliases=()) -> Server:
    """The server for a loaded model; ``server.app`` is the ASGI app (its startup starts
    the scheduler thread, its shutdown stops it)."""
    from ..generate import context_length
    from ..kv_defaults import with_model_defaults

    if prompt_cache_bytes is None:
        prompt_cache_bytes = max_kv_bytes // 4
    prefix_cache = PrefixCache(prompt_cache_size, min(prompt_cache_bytes, max_kv_bytes))
    # The model's defaults once, here: every cache, batch and byte estimate then agrees.
    scheduler = Scheduler(model, tokenizer, with_model_defaults(model, kv_options or {}),
                          prefix_cache,
                          decode_concurrency=decode_concurrency, max_kv_bytes=max_kv_bytes,
                          max_waiting=max_waiting, prefill_step_size=prefill_step_size)
    served = ServedModel(id=model_id, aliases=tuple(aliases),
                         context_length=context_length(model),
                         vocab_size=model.args.vocab_size, default_max_tokens=max_tokens)
    return Server(scheduler, tokenizer, served)
