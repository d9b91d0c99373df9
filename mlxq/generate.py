"""Text generation: ``stream_generate``, ``generate`` and the ``python -m mlxq.generate`` CLI.

The module itself is callable: ``mlxq.generate(model, tokenizer, prompt, **options)``.
"""

import argparse
import os
import sys
import time
import types
from dataclasses import dataclass

import mlx.core as mx

from .cache import (
    cache_device_nbytes,
    cache_format_name,
    cache_fp16_nbytes,
    cache_nbytes,
    config_from_options,
    make_cache,
)
from .errors import ArgumentParser, MlxqError, cli_main
from .kv_config import DEFAULT_GROUP_SIZE, DEFAULT_RECENT, DEFAULT_SINK
from .prompt import check_token_ids, encode_prompt, is_utf8_text, read_prompt_stdin
from .sampling import make_sampler

DEFAULT_PROMPT = "Write a short story about a robot learning to paint."
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_PREFILL_STEP_SIZE = 512


@dataclass
class GenerationResponse:
    """One streamed piece of output plus running statistics."""

    text: str  # new text since the previous response (may be empty mid-character)
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float  # tokens after the first one / time since the first one
    peak_memory: int  # bytes, MLX allocator peak since generation started
    kv_nbytes: int
    kv_fp16_nbytes: int | None  # what an fp16 cache of the same capacity would take
    finish_reason: str | None  # None while streaming, then "stop" (EOS) or "length"
    prompt_cached_tokens: int = 0  # prompt tokens taken from a prompt cache, not computed
    # kv_nbytes with full-precision caches weighed as float16 (what a GPU holds; the CPU
    # computes in float32): the numerator of the printed ratio
    kv_device_nbytes: int | None = None
    kv_format: str = "fp16"  # the quantized caches' format name (model defaults included)


def context_length(model) -> int | None:
    """The model's maximum number of positions, if its config says."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "context_length", "n_ctx"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prefill_chunks(model, prompt_ids, caches, prefill_step_size, start: int = 0):
    """Feed ``prompt_ids[start:-1]`` into ``caches`` in chunks, yielding after each one.

    The cache is evaluated after every chunk so the graph (and activation memory) stays
    bounded by ``prefill_step_size``; chunk boundaries depend only on ``start`` and the
    prompt, so a caller may interleave other work between chunks without changing the
    numbers. The last prompt token is left for the first ``next_token`` step.
    """
    prompt = mx.array(prompt_ids)
    done = start
    while len(prompt_ids) - done > 1:
        n = min(prefill_step_size, len(prompt_ids) - 1 - done)
        model(prompt[None, done : done + n], cache=caches)
        mx.eval([c.state for c in caches])
        mx.clear_cache()
        done += n
        yield n


def next_token(model, tokens, caches, sampler):
    """Feed ``tokens`` (1-D ids) and return the sampled next id, lazily (shape (1,))."""
    logits = model(tokens[None], cache=caches)
    return sampler(logits[:, -1, :])


def _token_stream(model, prompt_ids, caches, sampler, max_tokens, prefill_step_size, start=0):
    """Yield generated token ids. The next step is queued before the current id is read.
    ``caches`` already hold ``prompt_ids[:start]``."""
    for _ in prefill_chunks(model, prompt_ids, caches, prefill_step_size, start):
        pass

    y = next_token(model, mx.array(prompt_ids[-1:]), caches, sampler)
    mx.async_eval(y)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y = next_token(model, y, caches, sampler)
            mx.async_eval(next_y)
        yield y.item()
        if n % 256 == 255:
            mx.clear_cache()
        if n + 1 < max_tokens:
            y = next_y


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = None,
    kv_bits: int = 16,
    kv_group_size: int | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    system: str | None = None,
    chat_template: bool = True,
    prompt_cache=None,
    **kv_options,
):
    """Generate from ``prompt`` (text or token ids), yielding ``GenerationResponse`` pieces.

    Stops at any of ``tokenizer.eos_token_ids`` (finish_reason "stop") or after
    ``max_tokens`` tokens or at the model's context length ("length"). ``prompt_cache``
    (an ``mlxq.prompt_cache.PromptCache``, used up) supplies the keys/values of the
    longest prefix it shares with the prompt; its KV settings replace ``kv_options``.
    """
    for name, value in (("max_tokens", max_tokens), ("prefill_step_size", prefill_step_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MlxqError(f"{name} must be an integer of at least 1, got {value!r}")
    sampler = make_sampler(temp, top_p, seed)
    prompt_ids = encode_prompt(tokenizer, prompt, system=system, chat_template=chat_template)
    if not prompt_ids:
        raise MlxqError("the prompt is empty")
    check_token_ids(prompt_ids, model, from_text=isinstance(prompt, str))
    ctx = context_length(model)
    if ctx is not None:
        if len(prompt_ids) > ctx:
            raise MlxqError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {ctx}"
            )
        # The last generated token is never fed back, hence + 1.
        max_tokens = min(max_tokens, ctx - len(prompt_ids) + 1)
    if prompt_cache is not None:
        from .prompt_cache import reuse_prefix

        start = reuse_prefix(prompt_cache, prompt_ids)
        caches = prompt_cache.caches
    else:
        start = 0
        try:
            caches = make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size,
                                **kv_options)
        except TypeError as e:  # an unknown or ill-typed cache option
            raise MlxqError(f"bad KV cache option: {e}") from None

    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    first_token_time = tic
    n = 0

    def response(text, token, finish_reason):
        now = time.perf_counter()
        gen_time = now - first_token_time
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(prompt_ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory(),
            kv_nbytes=cache_nbytes(caches),
            kv_fp16_nbytes=cache_fp16_nbytes(caches),
            kv_device_nbytes=cache_device_nbytes(caches),
            kv_format=cache_format_name(caches),
            finish_reason=finish_reason,
            prompt_cached_tokens=start,
        )

    token = None
    finish_reason = "length"
    for token in _token_stream(model, prompt_ids, caches, sampler, max_tokens,
                               prefill_step_size, start):
        n += 1
        if n == 1:
            first_token_time = time.perf_counter()
            prompt_tps = len(prompt_ids) / (first_token_time - tic)
        if token in eos:
            finish_reason = "stop"
            break
        detokenizer.add_token(token)
        if n == max_tokens:
            break
        yield response(detokenizer.last_segment, token, None)
    detokenizer.finalize()
    yield response(detokenizer.last_segment, token, finish_reason)


def generate(model, tokenizer, prompt, **options) -> str:
    """The whole generated text (see ``stream_generate`` for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **options))


# --- command line ----------------------------------------------------------------------
def _format_stats(r: GenerationResponse) -> str:
    kv = f"KV cache ({r.kv_format}): {r.kv_nbytes / 1e6:.2f} MB"
    if r.kv_fp16_nbytes:
        kv += f" ({(r.kv_device_nbytes or r.kv_nbytes) / r.kv_fp16_nbytes:.2f}x fp16)"
    return (
        f"prompt: {r.prompt_tokens} tokens"
        f"{f' ({r.prompt_cached_tokens} cached)' if r.prompt_cached_tokens else ''}, "
        f"{r.prompt_tps:.1f} tokens/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s | "
        f"peak memory: {r.peak_memory / 1e6:.1f} MB | {kv}"
    )


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m mlxq.generate", description="Generate text with an mlxq model."
    )
    p.add_argument("--model", help="model folder or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text; '-' reads stdin")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="feed the prompt as plain text")
    add_kv_args(p)
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    p.add_argument("--prompt-cache-file", default=None, metavar="FILE",
                   help="a prompt cache written by python -m mlxq.cache_prompt: its longest "
                        "common prefix with the prompt is not computed again (the KV "
                        "options must be those it was saved with)")
    return p


def add_kv_args(p: argparse.ArgumentParser) -> None:
    """The --kv-* flags (generate, cache_prompt and the server take the same ones)."""
    p.add_argument("--kv-bits", type=int, default=16, choices=(16, 8, 4),
                   help="KV cache bits: 16 = full precision (default); the --kv-* options "
                        "below apply to 8 and 4 only")
    p.add_argument("--kv-group-size", type=int, default=None, choices=(32, 64, 128),
                   help=f"quantized KV group size (default: {DEFAULT_GROUP_SIZE}, see docs/quality.md)")
    p.add_argument("--kv-recent", type=int, default=None, metavar="N",
                   help="newest tokens kept in full precision by a quantized KV cache "
                        f"(default: {DEFAULT_RECENT})")
    p.add_argument("--kv-sink", type=int, default=None, metavar="N",
                   help="first tokens of the sequence kept in full precision by a quantized "
                        f"KV cache (default: {DEFAULT_SINK})")
    p.add_argument("--no-kv-rotation", action="store_true",
                   help="no Hadamard rotation of the quantized KV cache")
    p.add_argument("--no-kv-key-center", action="store_true",
                   help="no per-block key centering in the quantized KV cache (saves 2*D "
                        "bytes per 128 tokens per KV head; see docs/quality.md)")
    p.add_argument("--kv-key-bits", type=int, default=None, choices=(8, 4),
                   help="bits of the quantized cache's keys, when not those of the values "
                        "(default: --kv-bits; Gemma 3 with --kv-bits 4: 8, see docs/quality.md)")


def kv_options_from_args(args) -> dict:
    """make_cache's keyword arguments from the --kv-* flags (generate, cache_prompt, server)."""
    return {"kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size,
            "kv_recent": args.kv_recent, "kv_sink": args.kv_sink,
            "kv_rotation": not args.no_kv_rotation,
            "kv_key_center": not args.no_kv_key_center, "kv_key_bits": args.kv_key_bits}


def check_kv_args(args) -> None:
    """The --kv-* flags' one-line errors, before anything is loaded."""
    from .kv_flags import check_quantized_only

    check_quantized_only([args.kv_bits], **{
        "--kv-group-size": args.kv_group_size, "--kv-recent": args.kv_recent,
        "--kv-sink": args.kv_sink, "--no-kv-rotation": args.no_kv_rotation,
        "--no-kv-key-center": args.no_kv_key_center, "--kv-key-bits": args.kv_key_bits})
    for flag, n in (("--kv-recent", args.kv_recent), ("--kv-sink", args.kv_sink)):
        if n is not None and n < 0:
            raise MlxqError(f"{flag} must be at least 0, got {n}")
    config_from_options(**kv_options_from_args(args))


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    # Cheap checks first, before loading anything.
    from .backend import kernel_backend

    kernel_backend()  # a bad MLXQ_KERNELS is reported at once, whatever the cache
    if args.max_tokens < 1:
        raise MlxqError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.prefill_step_size < 1:
        raise MlxqError(f"--prefill-step-size must be at least 1, got {args.prefill_step_size}")
    make_sampler(args.temp, args.top_p, args.seed)  # validates --temp / --top-p
    check_kv_args(args)
    if args.prompt_cache_file is not None and not os.path.isfile(args.prompt_cache_file):
        raise MlxqError(f"--prompt-cache-file {args.prompt_cache_file}: no such file")
    prompt = read_prompt_stdin() if args.prompt == "-" else args.prompt
    for what, text in (("--prompt", prompt), ("--system", args.system)):
        if text is not None and not is_utf8_text(text):
            raise MlxqError(f"{what} is not valid UTF-8 text")
    if not prompt.strip():
        raise MlxqError("the prompt is empty")

    from .loading import load_for_cli

    model, tokenizer = load_for_cli(args.model)
    if args.kv_bits != 16:
        from .kv_flags import check_model_heads

        check_model_heads(model, [args.kv_group_size or 64], "use --kv-bits 16")
    kv_options = kv_options_from_args(args)  # make_cache adds the model's defaults
    prompt_cache = None
    if args.prompt_cache_file is not None:
        from .prompt_cache import load_prompt_cache

        prompt_cache = load_prompt_cache(args.prompt_cache_file, model, kv_options)
    last = None
    for last in stream_generate(
        model, tokenizer, prompt,
        max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed,
        prefill_step_size=args.prefill_step_size, system=args.system,
        chat_template=not args.ignore_chat_template, prompt_cache=prompt_cache, **kv_options,
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(_format_stats(last), file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """Lets ``mlxq.generate(...)`` call ``generate`` although the name is this module."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
