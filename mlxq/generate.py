"""Text generation: ``stream_generate``, ``generate`` and the ``python -m mlxq.generate`` CLI.

The module itself is callable: ``mlxq.generate(model, tokenizer, prompt, **options)``.
"""

import contextlib
import operator
import sys
import time
import types
from dataclasses import dataclass

import mlx.core as mx

from .cache import cache_class, cache_fp16_nbytes, cache_nbytes, make_cache
from .errors import ArgumentParser, MlxqError, cli_main
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


def context_length(model) -> int | None:
    """The model's maximum number of positions, if its config says."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "context_length", "n_ctx"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids)
    if system:
        prompt = f"{system}\n\n{prompt}"
    # Add BOS etc. unless the text already starts with it.
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos))))


def _token_stream(model, prompt_ids, caches, sampler, max_tokens, prefill_step_size):
    """Yield generated token ids. The next step is queued before the current id is read."""
    prompt = mx.array(prompt_ids)
    n_prompt = len(prompt_ids)

    # Chunked prefill: all but the last prompt token, evaluating the cache after each
    # chunk so the graph (and activation memory) stays bounded by prefill_step_size.
    done = 0
    while n_prompt - done > 1:
        n = min(prefill_step_size, n_prompt - 1 - done)
        model(prompt[None, done : done + n], cache=caches)
        mx.eval([c.state for c in caches])
        mx.clear_cache()
        done += n

    def step(tokens):
        logits = model(tokens[None], cache=caches)
        return sampler(logits[:, -1, :])

    y = step(prompt[done:])
    mx.async_eval(y)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y = step(y)
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
    **kv_options,
):
    """Generate from ``prompt`` (text or token ids), yielding ``GenerationResponse`` pieces.

    Stops at any of ``tokenizer.eos_token_ids`` (finish_reason "stop") or after
    ``max_tokens`` tokens or at the model's context length ("length").
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
    try:
        caches = make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size, **kv_options)
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
            finish_reason=finish_reason,
        )

    token = None
    finish_reason = "length"
    for token in _token_stream(model, prompt_ids, caches, sampler, max_tokens,
                               prefill_step_size):
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
    kv = f"KV cache: {r.kv_nbytes / 1e6:.2f} MB"
    if r.kv_fp16_nbytes:
        kv += f" ({r.kv_nbytes / r.kv_fp16_nbytes:.2f}x fp16)"
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s | "
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
    p.add_argument("--kv-bits", type=int, default=16, choices=(16, 8, 4),
                   help="KV cache bits: 16 = full precision (default); the --kv-* options "
                        "below apply to 8 and 4 only")
    p.add_argument("--kv-group-size", type=int, default=None, choices=(32, 64, 128),
                   help="quantized KV group size (default: 64, see docs/quality.md)")
    p.add_argument("--kv-recent", type=int, default=None, metavar="N",
                   help="newest tokens kept in full precision by a quantized KV cache "
                        "(default: 256)")
    p.add_argument("--kv-sink", type=int, default=None, metavar="N",
                   help="first tokens of the sequence kept in full precision by a quantized "
                        "KV cache (default: 4)")
    p.add_argument("--no-kv-rotation", action="store_true",
                   help="no Hadamard rotation of the quantized KV cache")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    return p


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
    cache_class(args.kv_bits, args.kv_group_size or 64)
    from .kv_flags import check_model_heads, check_quantized_only

    check_quantized_only([args.kv_bits], **{
        "--kv-group-size": args.kv_group_size, "--kv-recent": args.kv_recent,
        "--kv-sink": args.kv_sink, "--no-kv-rotation": args.no_kv_rotation})
    for flag, n in (("--kv-recent", args.kv_recent), ("--kv-sink", args.kv_sink)):
        if n is not None and n < 0:
            raise MlxqError(f"{flag} must be at least 0, got {n}")
    prompt = read_prompt_stdin() if args.prompt == "-" else args.prompt
    for what, text in (("--prompt", prompt), ("--system", args.system)):
        if text is not None and not is_utf8_text(text):
            raise MlxqError(f"{what} is not valid UTF-8 text")
    if not prompt.strip():
        raise MlxqError("the prompt is empty")

    from .loading import load_for_cli

    model, tokenizer = load_for_cli(args.model)
    if args.kv_bits != 16:
        check_model_heads(model, [args.kv_group_size or 64], "use --kv-bits 16")
    last = None
    for last in stream_generate(
        model, tokenizer, prompt,
        max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed,
        kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
        kv_recent=args.kv_recent, kv_sink=args.kv_sink, kv_rotation=not args.no_kv_rotation,
        prefill_step_size=args.prefill_step_size, system=args.system,
        chat_template=not args.ignore_chat_template,
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
