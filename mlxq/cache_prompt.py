"""``python -m mlxq.cache_prompt``: compute a prompt's KV cache once and save it, so that
``python -m mlxq.generate --prompt-cache-file FILE`` skips the prefix it shares with a
later prompt (a long document or system prompt asked many questions).

The prompt is encoded exactly as ``mlxq.generate`` encodes it (chat template, --system,
--ignore-chat-template), so a later prompt that starts with the same text reuses it.
"""

import sys

from .errors import ArgumentParser, MlxqError, cli_main
from .generate import (
    DEFAULT_PREFILL_STEP_SIZE,
    add_kv_args,
    check_kv_args,
    kv_options_from_args,
    prefill_chunks,
)
from .prompt import encode_prompt


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m mlxq.cache_prompt",
                                description="Save the KV cache of a prompt to a file.")
    p.add_argument("--model", help="model folder or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", required=True, help="prompt text; '-' reads stdin")
    p.add_argument("--prompt-cache-file", required=True, metavar="FILE",
                   help="where to write the cache (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="feed the prompt as plain text")
    add_kv_args(p)
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE)
    return p


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    from .output_files import check_output_file

    check_kv_args(args)
    if args.prefill_step_size < 1:
        raise MlxqError(f"--prefill-step-size must be at least 1, got {args.prefill_step_size}")
    out = check_output_file(args.prompt_cache_file, args.force)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise MlxqError("the prompt is empty")

    from .cache import make_cache
    from .generate import context_length
    from .loading import load_for_cli
    from .prompt_cache import PromptCache, save_prompt_cache

    model, tokenizer = load_for_cli(args.model)
    ids = encode_prompt(tokenizer, prompt, system=args.system,
                        chat_template=not args.ignore_chat_template)
    ctx = context_length(model)
    if ctx is not None and len(ids) > ctx:
        raise MlxqError(f"the prompt has {len(ids)} tokens but the model's context is {ctx}")
    caches = make_cache(model, **kv_options_from_args(args))
    # prefill_chunks leaves the last token out (generation feeds it); a cache file holds
    # every prompt token, so feed one past the end.
    for _ in prefill_chunks(model, ids + [ids[-1]], caches, args.prefill_step_size):
        pass
    save_prompt_cache(out, PromptCache(caches, ids), model_name=str(args.model or "default"))
    kv = sum(c.nbytes for c in caches)
    print(f"saved {len(ids)} tokens ({kv / 1e6:.2f} MB of KV cache) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
