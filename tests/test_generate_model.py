"""Generation with the default model (SmolLM2-135M-Instruct): text quality and options."""

import re

import pytest

from mlxq.generate import generate, stream_generate

# Common English words; coherent output uses several of them, gibberish almost none.
COMMON_WORDS = set(
    """a about after all also an and any are as at be because been but by can could day
    did do does each even every first for from get go good great had has have he her him
    his how i if in into is it its just know like little long make many may me more most
    my new no not now of on one only or other our out over people said see she so some
    such than that the their them then there these they thing things this time to two up
    us use very was way we well were what when where which while who will with would year
    you your robot paint painting painted colors color canvas art brush learn learned
    learning world life beautiful named once upon story""".split()
)


def assert_english(text, min_common=5):
    letters = sum(ch.isascii() and (ch.isalpha() or ch.isspace()) for ch in text)
    assert text and letters / len(text) > 0.85, text
    words = re.findall(r"[a-z']+", text.lower())
    common = set(words) & COMMON_WORDS
    assert len(common) >= min_common, (common, text)


def _tokens(model, tokenizer, prompt, **kw):
    return [r.token for r in stream_generate(model, tokenizer, prompt, **kw)]


def test_greedy_chat_output_is_english(default_model):
    model, tokenizer = default_model
    text = generate(model, tokenizer, "Write a short story about a robot learning to paint.",
                    max_tokens=40)
    assert_english(text)


def test_without_chat_template(default_model):
    model, tokenizer = default_model
    prompt = "The old lighthouse keeper looked out at the sea and"
    plain = list(stream_generate(model, tokenizer, prompt, max_tokens=24, chat_template=False))
    chat = list(stream_generate(model, tokenizer, prompt, max_tokens=1))
    # The template wraps the prompt in role markers, so it is longer as tokens.
    assert chat[-1].prompt_tokens > plain[-1].prompt_tokens
    assert plain[-1].prompt_tokens == len(tokenizer.encode(prompt))
    assert_english("".join(r.text for r in plain), min_common=4)


def test_system_message_reaches_the_prompt(default_model):
    model, tokenizer = default_model
    a = list(stream_generate(model, tokenizer, "Hi", max_tokens=1, system="Be brief."))
    b = list(stream_generate(model, tokenizer, "Hi", max_tokens=1,
                             system="Be brief. Answer like a pirate would, always."))
    assert b[-1].prompt_tokens > a[-1].prompt_tokens


def test_chunked_prefill_matches_one_shot(default_model):
    model, tokenizer = default_model
    # Kept short: prefill on MLX's CPU backend is slow. Cache growth across blocks
    # is covered on a tiny model in test_generate_unit.py.
    prompt = "Summarize: " + " ".join(
        f"the {w} measured {i * 7 % 31} units." for i, w in enumerate(["river", "forest"] * 3)
    )
    opts = dict(max_tokens=4, chat_template=False)
    one_shot = list(stream_generate(model, tokenizer, prompt, prefill_step_size=4096, **opts))
    assert one_shot[-1].prompt_tokens > 3 * 8  # several chunks below
    chunked = _tokens(model, tokenizer, prompt, prefill_step_size=8, **opts)
    assert chunked == [r.token for r in one_shot]


def test_seeded_sampling_is_reproducible(default_model):
    model, tokenizer = default_model
    opts = dict(max_tokens=12, temp=1.0, top_p=0.95)
    prompt = "Tell me a joke."
    a = _tokens(model, tokenizer, prompt, seed=11, **opts)
    assert a == _tokens(model, tokenizer, prompt, seed=11, **opts)
    assert a != _tokens(model, tokenizer, prompt, seed=12, **opts)


def test_stops_at_eos(default_model):
    model, tokenizer = default_model
    responses = list(stream_generate(model, tokenizer, "What color is the sky? One word.",
                                     max_tokens=64))
    last = responses[-1]
    assert last.finish_reason == "stop"
    assert last.token in tokenizer.eos_token_ids
    assert last.generation_tokens < 64
    text = "".join(r.text for r in responses)
    assert "<|im_end|>" not in text and text.strip()


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"kv_bits": 2}])
def test_bad_options_raise_before_work(default_model, bad):
    from mlxq.errors import MlxqError

    model, tokenizer = default_model
    with pytest.raises(MlxqError):
        next(stream_generate(model, tokenizer, "Hi", **bad))
