"""mlxq.server over loopback: the real openai client, continuous batching, disconnects,
bad requests, memory admission, prefix reuse and a bounded soak.

Every server runs in-process on a free 127.0.0.1 port and is shut down by its context
manager. Only the openai-client test uses the whole default model. Tests of text (prefix
reuse, stop strings) use it cut to 2 layers (real tokenizer and chat template); tests of
the serving machinery (many streams, admission, soak) use a tiny random model, since the
default model's 49K-word output layer alone costs ~45 ms per token on a 2-core CPU."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest

import mlxq
from mlxq.generate import generate
from mlxq.prompt import encode_prompt
from mlxq.server import create_server
from mlxq.server.background import running
from mlxq.server.protocol import ServedModel, parse_chat

MODEL_ID = "SmolLM2-135M-Instruct"
MB = 10**6


@pytest.fixture(scope="module")
def small_default(default_model_dir):
    """The default model cut to its first 2 layers (its own copy: the session's stays whole)."""
    model, tokenizer = mlxq.load(default_model_dir)
    model.model.layers = model.model.layers[:2]
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """A 2-layer random llama (head_dim 64, as the int4 cache needs) with a small BPE
    tokenizer and a chat template."""
    from conftest import tiny_config, tiny_weights, write_hf_checkpoint

    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, max_position_embeddings=2048)
    folder = write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "model", config,
                                 tiny_weights(config), dtype="float32")
    return mlxq.load(folder)


def make_server(model_and_tokenizer, **options):
    model, tokenizer = model_and_tokenizer
    options.setdefault("max_kv_bytes", 2 * 10**9)
    return create_server(model, tokenizer, MODEL_ID, **options)


def prefilled_caches(model, ids, **kv_options):
    """Caches holding ``ids`` (prefilled as the server does), for a decode step."""
    from mlxq.cache import make_cache
    from mlxq.generate import prefill_chunks

    caches = make_cache(model, **kv_options)
    list(prefill_chunks(model, ids, caches, 512))
    return caches


def chat_ids(tokenizer, text):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True))


def health(url):
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(url)
        if h["active"] == 0 and h["waiting"] == 0 and h["kv_reserved_bytes"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server not idle: {health(url)}")


def stream_text(client, **kwargs):
    """Streamed chat text and the chunks' finish reason."""
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


# --- the real openai client on the whole default model, int4 KV ---------------------------------
def test_openai_client_plain_and_streamed(default_model):
    openai = pytest.importorskip("openai")
    model, tokenizer = default_model
    server = make_server(default_model, kv_options={"kv_bits": 4})
    question = "What is the capital of France?"
    with running(server) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL_ID]
        messages = [{"role": "user", "content": question}]
        plain = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                               max_tokens=12, temperature=0)
        text = plain.choices[0].message.content
        # The oracle: mlxq.generate on the same tokens with the same int4 cache.
        ids = chat_ids(tokenizer, question)
        assert text == generate(model, tokenizer, ids, max_tokens=12, kv_bits=4)
        assert text.strip()
        assert plain.usage.prompt_tokens == len(ids)
        assert plain.usage.completion_tokens <= 12

        chunks = list(client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        # The whole conversation is cached now: the same request reuses all but one token.
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids) - 1

        prompt = "The capital of France is"
        done = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8)
        expected = generate(model, tokenizer, encode_prompt(tokenizer, prompt,
                                                            chat_template=False),
                            max_tokens=8, kv_bits=4)
        assert done.choices[0].text == expected
        assert done.choices[0].finish_reason in ("stop", "length")
        pieces = [c.choices[0].text for c in client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=8, stream=True)]
        assert "".join(pieces) == expected


# --- continuous batching -----------------------------------------------------------------------
@pytest.mark.parametrize("kv_bits", [4, 16])
def test_16_concurrent_streams_match_each_request_alone(tiny_random, kv_bits):
    openai = pytest.importorskip("openai")
    # No prefix cache: a request's text must not depend on what ran before it either.
    server = make_server(tiny_random, kv_options={"kv_bits": kv_bits}, prompt_cache_size=0,
                         decode_concurrency=16)
    prompts = [f"Tell me about the number {i}." for i in range(16 * 3)]
    with running(server) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(prompt, stream):
            kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                          max_tokens=6 + len(prompt) % 5, temperature=0)
            if stream:
                return stream_text(client, **kwargs)
            r = client.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.choices[0].finish_reason

        alone = {p: ask(p, stream=False) for p in prompts[:16]}
        assert health(url)["peak_batch"] == 1

        def worker(k):  # each stream sends 3 requests, one after the other
            return [(p, ask(p, stream=True)) for p in prompts[k::16]]

        with ThreadPoolExecutor(16) as pool:
            results = [r for rs in pool.map(worker, range(16)) for r in rs]
        h = wait_idle(url)
    assert len(results) == 48
    assert all(finish in ("stop", "length") for _, (_, finish) in results)
    assert h["peak_batch"] > 4  # requests really ran together
    # ... and each decode step was one forward of all of them (the batched caches).
    assert h["decode_forwards"] == h["decode_steps"]
    for prompt, got in results:
        if prompt in alone:
            assert got == alone[prompt], prompt
    # The oracle for the alone answers: mlxq.generate.
    model, tokenizer = tiny_random
    for prompt in prompts[:2]:
        expected = generate(model, tokenizer, chat_ids(tokenizer, prompt),
                            max_tokens=6 + len(prompt) % 5, kv_bits=kv_bits)
        assert alone[prompt][0] == expected


def test_one_forward_per_decode_step_as_sequences_join_and_leave(tiny_random, monkeypatch):
    """The scheduler driven step by step: a request decodes alone, two of other lengths
    join mid-stream and leave before it. Every decode step is one batched attention call
    per layer over all decoding sequences, and every request gets the tokens it gets
    alone (mlxq.generate)."""
    import mlxq.attention as attention
    from mlxq.generate import stream_generate
    from mlxq.server.prefix_cache import PrefixCache
    from mlxq.server.protocol import CompletionParams
    from mlxq.server.scheduler import Scheduler

    model, tokenizer = tiny_random
    layers = len(model.layers)
    batch_sizes, single_decodes = [], []
    batch_attend, quantized_attend = attention.batch_attend, attention.quantized_attend
    monkeypatch.setattr(attention, "batch_attend", lambda q, *a: (
        batch_sizes.append(q.shape[0]), batch_attend(q, *a))[1])
    monkeypatch.setattr(attention, "quantized_attend", lambda q, *a: (
        single_decodes.append(q.shape[2] == 1), quantized_attend(q, *a))[1])
    scheduler = Scheduler(model, tokenizer, {"kv_bits": 4}, PrefixCache(0, 0),
                          max_kv_bytes=10**9, prefill_step_size=4)
    # Prompts fed in chunks of 4 with no 1-token chunk: any 1-token attention is a decode.
    requests = {"long": (list(range(30, 51)), 20), "short": (list(range(60, 65)), 8),
                "mid": (list(range(70, 82)), 6)}
    seqs = {}

    def submit(name):
        ids, max_tokens = requests[name]
        scheduler.submit(CompletionParams(False, ids, max_tokens), lambda event: None)
        seqs[name] = scheduler._waiting[-1]

    def iterate():
        steps = scheduler.stats()["decode_steps"]
        scheduler._iteration(set())
        return scheduler.stats()["decode_steps"] - steps

    submit("long")
    while len(seqs["long"].sampled) < 3:
        iterate()
    submit("short")
    submit("mid")
    steps = 3
    while scheduler._active:
        steps += iterate()
    assert not any(single_decodes)
    assert len(batch_sizes) == layers * steps == layers * scheduler.stats()["decode_steps"]
    per_step = batch_sizes[::layers]
    assert per_step == [b for b in batch_sizes[layers - 1::layers]]
    # The batch grows as the newcomers' prefills end and shrinks as they finish.
    assert per_step[:3] == [1, 1, 1]
    assert [b for i, b in enumerate(per_step) if i == 0 or b != per_step[i - 1]] == \
        [1, 2, 3, 2, 1]
    assert sum(per_step) == sum(len(s.sampled) for s in seqs.values())
    assert scheduler.decoder.rows == [] and scheduler.stats()["kv_active_bytes"] == 0
    for name, (ids, max_tokens) in requests.items():
        alone = [r.token for r in stream_generate(model, tokenizer, ids,
                                                  max_tokens=max_tokens, kv_bits=4)]
        assert seqs[name].sampled == alone, name


def test_client_disconnect_frees_slot_and_memory(tiny_random):
    server = make_server(tiny_random, kv_options={"kv_bits": 4}, decode_concurrency=1,
                         prompt_cache_size=0)
    body = {"messages": [{"role": "user", "content": "Count to one thousand."}],
            "max_tokens": 2000, "stream": True}
    with running(server) as url:
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data: ") for line in got)
                assert health(url)["active"] == 1
        # Closed mid-stream: the only slot and its reservation come back.
        h = wait_idle(url)
        assert h["requests_cancelled"] == 1 and h["kv_active_bytes"] == 0
        # A non-streamed request whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", timeout=1.0,
                       json={**body, "stream": False})
        h = wait_idle(url)
        assert h["requests_cancelled"] == 2 and h["requests_finished"] == 0
        # With decode_concurrency 1, this is served only if the slot was freed.
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_one_token_prompt_takes_its_first_step_alone_then_joins(tiny_random):
    """A one-token prompt has no cache to join the batch with: its first decode step is a
    forward of its own, the next ones are rows of the batch; its tokens are its own."""
    from mlxq.generate import stream_generate
    from mlxq.server.prefix_cache import PrefixCache
    from mlxq.server.protocol import CompletionParams
    from mlxq.server.scheduler import Scheduler

    model, tokenizer = tiny_random
    scheduler = Scheduler(model, tokenizer, {"kv_bits": 4}, PrefixCache(0, 0),
                          max_kv_bytes=10**9)
    seqs = []
    for ids in ([40, 41, 42, 43, 44], [7]):
        scheduler.submit(CompletionParams(False, ids, 5), lambda event: None)
        seqs.append(scheduler._waiting[-1])
    while scheduler._active or scheduler._waiting:
        scheduler._iteration(set())
    stats = scheduler.stats()
    assert stats["peak_batch"] == 2
    assert scheduler.decoder.forwards == stats["decode_steps"] + 1
    for s in seqs:
        ids = s.params.prompt_ids
        assert s.sampled == [r.token for r in stream_generate(model, tokenizer, ids,
                                                              max_tokens=5, kv_bits=4)]


def test_mlx_lm_bridge_models_decode_one_forward_per_sequence():
    """A model built by the mlx-lm bridge cannot take the batch's per-sequence offsets: its
    decode steps stay one forward per sequence, with each sequence's own tokens."""
    from mlxq.generate import next_token
    from mlxq.models import build_model
    from mlxq.sampling import make_sampler
    from mlxq.server.scheduler import BatchDecoder, Sequence

    model = build_model({"model_type": "phi3", "hidden_size": 128, "num_hidden_layers": 2,
                         "intermediate_size": 128, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 64,
                         "rope_theta": 10000.0, "max_position_embeddings": 256,
                         "tie_word_embeddings": False})
    decoder = BatchDecoder(model, {"kv_bits": 4})
    assert not decoder.batched
    prompts = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13]]

    seqs = [Sequence(i, None, None, caches=prefilled_caches(model, ids, kv_bits=4),
                     last=mx.array(ids[-1:]), sampler=make_sampler())
            for i, ids in enumerate(prompts)]
    alone = [(prefilled_caches(model, ids, kv_bits=4), mx.array(ids[-1:])) for ids in prompts]
    for step in range(3):
        tokens = [t for t, logprobs in decoder.step(seqs)]
        for s, t in zip(seqs, tokens):
            s.last = mx.array([t])
        for i, (caches, last) in enumerate(alone):
            y = next_token(model, last, caches, make_sampler())
            assert tokens[i] == y.item()
            alone[i] = (caches, y)
    assert decoder.forwards == 6 and decoder.rows == []


def test_disconnect_leaves_the_running_batch_and_frees_its_memory(tiny_random):
    """Two streams decode as one batch; one client goes away: its row leaves the batch
    (and its bytes), the other stream keeps going; when both are gone, MLX's active
    memory is back where it started."""
    server = make_server(tiny_random, kv_options={"kv_bits": 4}, prompt_cache_size=0)
    body = {"messages": [{"role": "user", "content": "Count to one thousand."}],
            "max_tokens": 1500, "stream": True}
    with running(server) as url, httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        assert a.post(f"{url}/v1/chat/completions",
                      json={**body, "stream": False, "max_tokens": 3}).status_code == 200
        base = wait_idle(url)
        with a.stream("POST", f"{url}/v1/chat/completions", json=body) as ra:
            lines_a = ra.iter_lines()
            with b.stream("POST", f"{url}/v1/chat/completions", json=body) as rb:
                lines_b = rb.iter_lines()
                deadline = time.monotonic() + 20
                while health(url)["batch"] < 2:
                    next(lines_a), next(lines_b)
                    assert time.monotonic() < deadline
                both = health(url)
            # b is gone: a alone in the batch, fewer bytes, and a still streams.
            deadline = time.monotonic() + 20
            while (h := health(url))["batch"] != 1:
                next(lines_a)
                assert time.monotonic() < deadline
            assert h["requests_cancelled"] == 1 and h["active"] == 1
            assert 0 < h["kv_active_bytes"] < both["kv_active_bytes"]
            assert [next(lines_a) for _ in range(6)]
        end = wait_idle(url)
    assert end["requests_cancelled"] == 2 and end["batch"] == 0
    assert end["kv_active_bytes"] == 0
    assert end["mlx_active_memory"] <= base["mlx_active_memory"]


# --- bad requests ------------------------------------------------------------------------------
LONG_PROMPT = "hello " * 3000  # > 2048 tokens, the tiny model's context
BAD_REQUESTS = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": ["hi"]}, 400, "messages[0]"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model"),
    ("chat", {"model": 7, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400,
     "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, 400,
     "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400,
     "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}],
              "max_completion_tokens": 1.5}, 400, "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400,
     "stream"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "seed": True}, 400, "seed"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stream_options": 1}, 400,
     "stream_options"),
    ("chat", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
              "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
              "top_logprobs": -1}, 400, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, 400,
     "logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": False,
              "top_logprobs": 0}, 400, "top_logprobs"),
    ("completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "logprobs": "yes"}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny_random):
    server = make_server(tiny_random)
    with running(server) as url, httpx.Client(timeout=30) as client:
        for path, body, status, param in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post(f"{url}/v1/{path.replace('chat', 'chat/completions')}",
                            content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body if len(content) < 200 else path, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
            assert error["param"] == param, (error, param)
        assert client.get(f"{url}/v1/chat/completions").status_code == 405
        r = client.get(f"{url}/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        ok = client.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "frequency_penalty": 0, "user": "someone", "some_new_field": {"x": 1}})
        assert ok.status_code == 200, ok.text
        assert wait_idle(url)["requests_finished"] == 1


def test_no_request_opens_files(tiny_random, default_model_dir, tmp_path, monkeypatch):
    """``model`` naming a real model folder or a new file is refused, nothing loads or saves."""
    import mlxq.loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a request reached file I/O")

    monkeypatch.setattr(mlxq.loading, "load", forbidden)
    monkeypatch.setattr(mlxq.loading, "load_model", forbidden)
    monkeypatch.setattr(mx, "save_safetensors", forbidden)
    monkeypatch.setattr(mx, "load", forbidden)
    target = tmp_path / "written"
    server = make_server(tiny_random)
    with running(server) as url, httpx.Client(timeout=30) as client:
        for name in (str(default_model_dir), str(target), "../../etc/passwd", MODEL_ID):
            r = client.post(f"{url}/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": f"open {target}"}],
                "max_tokens": 2, "stop": [str(target)]})
            assert r.status_code == (200 if name == MODEL_ID else 404), r.text
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


# --- memory admission ----------------------------------------------------------------------------
def test_admission_queue_full_is_503_and_too_big_is_400(tiny_random):
    from mlxq.server.scheduler import kv_bytes_needed

    model, _ = tiny_random
    one = kv_bytes_needed(model, {"kv_bits": 4}, 600)
    big = kv_bytes_needed(model, {"kv_bits": 4}, 1500)
    limit = (one + big) // 2
    assert one < limit < min(big, 2 * one)
    # Room for one request of ~600 tokens at a time and no waiting room.
    server = make_server(tiny_random, kv_options={"kv_bits": 4}, max_kv_bytes=limit,
                         max_waiting=0, prompt_cache_size=0)
    long_body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 500,
                 "stream": True}
    with running(server) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=long_body) as r:
            next(r.iter_lines())
            busy = client.post(f"{url}/v1/chat/completions", json=long_body)
            assert busy.status_code == 503
            assert int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "server_busy"
        too_big = client.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500})
        assert too_big.status_code == 400
        assert too_big.json()["error"]["code"] == "kv_memory_exceeded"
        wait_idle(url)
        ok = client.post(f"{url}/v1/chat/completions", json={**long_body, "stream": False,
                                                             "max_tokens": 3})
        assert ok.status_code == 200, ok.text


def test_waiting_requests_are_served_in_turn(tiny_random):
    """More requests than memory allows at once: they queue, and all finish."""
    from mlxq.server.scheduler import kv_bytes_needed

    model, _ = tiny_random
    one = kv_bytes_needed(model, {"kv_bits": 16}, 40)
    server = make_server(tiny_random, max_kv_bytes=2 * one, prompt_cache_size=0)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with running(server) as url:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/chat/completions", json=body,
                                                       timeout=60).status_code, range(6)))
        h = wait_idle(url)
    assert codes == [200] * 6
    assert h["peak_batch"] <= 2


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_kv_estimate_bounds_real_cache_bytes(tiny_random, kv_bits):
    from mlxq.cache import make_cache
    from mlxq.generate import next_token, prefill_chunks
    from mlxq.sampling import make_sampler
    from mlxq.server.scheduler import kv_bytes_needed

    model, _ = tiny_random
    for n_prompt, n_decode in ((3, 2), (300, 5), (700, 20)):
        ids = [(7 * i) % 1000 + 10 for i in range(n_prompt)]
        caches = make_cache(model, kv_bits=kv_bits)
        peak = 0
        for _ in prefill_chunks(model, ids, caches, 256):
            peak = max(peak, sum(c.nbytes for c in caches))
        y = mx.array(ids[-1:])
        for _ in range(n_decode):
            y = next_token(model, y, caches, make_sampler())
            mx.eval(y)
            peak = max(peak, sum(c.nbytes for c in caches))
        bound = kv_bytes_needed(model, {"kv_bits": kv_bits}, n_prompt + n_decode)
        assert peak <= bound, (n_prompt, peak, bound)
        assert bound <= 4 * peak + 2 * MB  # an upper bound, not a wild one


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_running_requests_reserve_the_padded_batch(tiny_random, kv_bits):
    """A short request next to a long one takes a long row in the decode batch: the
    reservation covers the real batch, which the sum of lone caches would undercount."""
    from mlxq.cache import make_cache
    from mlxq.generate import prefill_chunks
    from mlxq.sampling import make_sampler
    from mlxq.server.scheduler import BatchDecoder, Sequence, kv_bytes_needed

    model, _ = tiny_random
    decoder = BatchDecoder(model, {"kv_bits": kv_bits})
    seqs = []
    for i, n in enumerate((700, 5)):
        ids = [(7 * j) % 1000 + 10 for j in range(n)]
        caches = make_cache(model, kv_bits=kv_bits)
        list(prefill_chunks(model, ids, caches, 256))
        seqs.append(Sequence(i, None, None, caches=caches, last=mx.array(ids[-1:]),
                             sampler=make_sampler()))
    for _ in range(3):
        for s, (token, _) in zip(seqs, decoder.step(seqs)):
            s.last = mx.array([token])
    tokens = [700 + 10, 5 + 10]  # prompt + max_tokens of each
    alone = sum(kv_bytes_needed(model, {"kv_bits": kv_bits}, t) for t in tokens)
    assert alone < decoder.nbytes <= decoder.kv_bytes(tokens)


# --- prefix cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_bits", [16, 4])
def test_prefix_cache_reuses_an_earlier_conversation(small_default, kv_bits):
    turn1 = [{"role": "user", "content": "Name three colors of the rainbow."}]

    def conversation(url):
        with httpx.Client(timeout=60) as client:
            def ask(messages):
                r = client.post(f"{url}/v1/chat/completions", json={
                    "messages": messages, "max_tokens": 10})
                assert r.status_code == 200, r.text
                return r.json()

            first = ask(turn1)
            reply = first["choices"][0]["message"]["content"]
            turn2 = turn1 + [{"role": "assistant", "content": reply},
                             {"role": "user", "content": "And three more?"}]
            return first, ask(turn2)

    options = {"kv_options": {"kv_bits": kv_bits}}
    with running(make_server(small_default, **options)) as url:
        first, second = conversation(url)
        h = wait_idle(url)
    with running(make_server(small_default, prompt_cache_size=0, **options)) as url:
        _, cold = conversation(url)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # Turn 2 starts with turn 1's prompt and reply.
    assert cached >= first["usage"]["prompt_tokens"]
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert h["prefix_cache_entries"] >= 1
    if kv_bits == 16:  # full precision: reusing keys/values is exact
        assert second["choices"][0]["message"]["content"] == \
            cold["choices"][0]["message"]["content"]


def test_stop_strings_end_the_text_before_them(small_default):
    body = {"messages": [{"role": "user", "content": "Tell me about the number 3."}],
            "max_tokens": 12}
    with running(make_server(small_default)) as url, httpx.Client(timeout=30) as client:
        full = client.post(f"{url}/v1/chat/completions",
                           json={**body, "logprobs": True}).json()
        text = full["choices"][0]["message"]["content"]
        assert len(text) > 6
        stop = text[3:6]
        cut = text[:text.index(stop)]
        before_stop, spelled = [], ""
        for t in full["choices"][0]["logprobs"]["content"]:
            spelled += t["token"]
            if len(spelled.lstrip()) > len(cut.lstrip()):
                break
            before_stop.append(t["token"])
        for stream in (False, True):
            r = client.post(f"{url}/v1/chat/completions",
                            json={**body, "stop": [stop, "never appears"], "stream": stream,
                                  "logprobs": True})
            if stream:
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                got = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
                finish = events[-1]["choices"][0]["finish_reason"]
                tokens = [t["token"] for e in events if e["choices"][0]["logprobs"]
                          for t in e["choices"][0]["logprobs"]["content"]]
            else:
                got = r.json()["choices"][0]["message"]["content"]
                finish = r.json()["choices"][0]["finish_reason"]
                tokens = [t["token"] for t in
                          r.json()["choices"][0]["logprobs"]["content"]]
            assert (got, finish) == (cut, "stop")
            # The logprobs of the tokens whose whole text was sent: the full answer's, up
            # to the first one reaching into the stop string.
            assert tokens == before_stop, (cut, tokens)


# --- logprobs ------------------------------------------------------------------------------------
def log_softmax(logits) -> list[float]:
    logits = logits.astype(mx.float32)
    return (logits - mx.logsumexp(logits)).tolist()


def reference_logprobs(model, ids):
    """The oracle: log_softmax of the model's logits for the token after ``ids``, from one
    plain forward of the whole prompt (no server, no sampler)."""
    from mlxq.cache import make_cache

    return log_softmax(model(mx.array(ids)[None], cache=make_cache(model, kv_bits=16))[0, -1])


def check_entries(entries, text, top, tokenizer):
    """Chat logprobs entries: they spell the text (the detokenizer drops the first token's
    leading space); each top list is sorted, ``top`` long, the greedy token (temperature
    0) first with the sampled token's logprob."""
    assert "".join(e.token for e in entries).lstrip() == text.lstrip()
    spelled = b"".join(bytes(e.bytes) for e in entries).decode()
    assert spelled.lstrip() == text.lstrip()
    for e in entries:
        assert bytes(e.bytes).decode(errors="replace") == e.token
        values = [t.logprob for t in e.top_logprobs]
        assert len(values) == top and values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values + [e.logprob])
        if top:
            assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
            assert e.top_logprobs[0].token == e.token


def test_logprobs_are_the_models_log_softmax_chat_and_completions(small_default):
    """Each endpoint, streamed and not: the first token's logprob and alternatives equal
    log_softmax of the model's logits for the prompt (a plain forward, the oracle),
    before temperature; a request that does not ask gets ``logprobs: null``."""
    openai = pytest.importorskip("openai")
    model, tokenizer = small_default
    question = "What is the capital of France?"
    ids = chat_ids(tokenizer, question)
    expected = reference_logprobs(model, ids)
    best = sorted(range(len(expected)), key=lambda i: -expected[i])[:3]
    messages = [{"role": "user", "content": question}]
    prompt = "The capital of France is"
    prompt_expected = reference_logprobs(
        model, encode_prompt(tokenizer, prompt, chat_template=False))
    with running(make_server(small_default, kv_options={"kv_bits": 16})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = dict(model=MODEL_ID, messages=messages, max_tokens=5, temperature=0)
        plain = client.chat.completions.create(logprobs=True, top_logprobs=3, **ask)
        choice = plain.choices[0]
        entries = choice.logprobs.content
        check_entries(entries, choice.message.content, 3, tokenizer)
        assert len(entries) == plain.usage.completion_tokens
        assert entries[0].logprob == pytest.approx(expected[best[0]], abs=1e-3)
        assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(
            [expected[i] for i in best], abs=1e-3)
        assert [t.token for t in entries[0].top_logprobs] == [tokenizer.decode([i])
                                                               for i in best]

        streamed = [c.choices[0] for c in client.chat.completions.create(
            stream=True, logprobs=True, top_logprobs=3, **ask) if c.choices]
        pieces = [e for c in streamed if c.logprobs for e in c.logprobs.content]
        assert [(e.token, e.top_logprobs) for e in pieces] == \
            [(e.token, e.top_logprobs) for e in entries]
        assert [e.logprob for e in pieces] == pytest.approx([e.logprob for e in entries],
                                                            abs=1e-5)

        # Sampled at temperature 2: still the model's own distribution, not the scaled one.
        hot = client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=1, temperature=2, seed=3,
            logprobs=True, top_logprobs=0).choices[0].logprobs.content[0]
        token_ids = tokenizer.encode(hot.token, add_special_tokens=False)
        assert hot.top_logprobs == []
        if len(token_ids) == 1:
            assert hot.logprob == pytest.approx(expected[token_ids[0]], abs=1e-3)

        none = client.chat.completions.create(**ask)
        assert none.choices[0].logprobs is None
        assert none.choices[0].message.content == choice.message.content
        assert all(c.choices[0].logprobs is None for c in client.chat.completions.create(
            stream=True, **ask) if c.choices)

        done = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5,
                                         logprobs=2)
        lp = done.choices[0].logprobs
        text = done.choices[0].text
        assert "".join(lp.tokens).lstrip() == text.lstrip()
        trim = len("".join(lp.tokens)) - len(text)  # a leading space the detokenizer drops
        assert lp.text_offset == [max(0, sum(map(len, lp.tokens[:i])) - trim)
                                  for i in range(len(lp.tokens))]
        assert lp.token_logprobs[0] == pytest.approx(max(prompt_expected), abs=1e-3)
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert len(top) <= 2 and max(top.values()) == pytest.approx(value, abs=1e-6)
            assert top[token] == pytest.approx(value, abs=1e-6)
        chunks = [c.choices[0] for c in client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=5, logprobs=2, stream=True)]
        assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == lp.tokens
        assert [t for c in chunks if c.logprobs for t in c.logprobs.text_offset] == \
            lp.text_offset
        assert client.completions.create(model=MODEL_ID, prompt=prompt,
                                         max_tokens=2).choices[0].logprobs is None
        zero = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2,
                                         logprobs=0).choices[0].logprobs
        assert zero.top_logprobs is None and len(zero.token_logprobs) == 2


def test_logprobs_of_batch_rows_are_each_sequences_own(tiny_random):
    """Rows of one batched step that asked for logprobs get their own row's (checked
    against each sequence's forward alone); a row that did not ask gets None."""
    from mlxq.sampling import make_sampler
    from mlxq.server.protocol import CompletionParams
    from mlxq.server.scheduler import BatchDecoder, Sequence

    model, _ = tiny_random
    decoder = BatchDecoder(model, {"kv_bits": 16})
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
    wanted = [(True, 3), (False, 0), (True, 0)]

    seqs = [Sequence(i, CompletionParams(True, ids, 4, logprobs=lp, top_logprobs=top), None,
                     caches=prefilled_caches(model, ids, kv_bits=16), last=mx.array(ids[-1:]),
                     sampler=make_sampler())
            for i, (ids, (lp, top)) in enumerate(zip(prompts, wanted))]
    alone = [(prefilled_caches(model, ids, kv_bits=16), mx.array(ids[-1:])) for ids in prompts]
    for _ in range(2):
        results = decoder.step(seqs)
        assert decoder.rows == seqs  # one batch
        for s, (token, logprobs), (caches, last), (lp, top) in zip(seqs, results, alone,
                                                                    wanted):
            expected = log_softmax(model(last[None], cache=caches)[0, -1])
            assert token == max(range(len(expected)), key=expected.__getitem__)
            if not lp:
                assert logprobs is None
            else:
                assert logprobs["logprob"] == pytest.approx(expected[token], abs=1e-4)
                best = sorted(range(len(expected)), key=lambda i: -expected[i])[:top]
                assert [i for i, _ in logprobs["top"]] == best
            s.last = mx.array([token])
        alone = [(caches, mx.array([t])) for (caches, _), (t, _) in zip(alone, results)]


def spm_tokenizer(folder):
    """A small SentencePiece-style tokenizer (byte fallback, ▁ for spaces), as mlxq
    builds from a GGUF 'llama' vocabulary."""
    from mlxq.loading import load_tokenizer
    from mlxq.tokenizer_build import write_tokenizer_files

    pieces = ["\u2581h", "é", "llo", "\u2581", "code", "x", "n"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    folder.mkdir()
    ids = write_tokenizer_files({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2}, folder)
    return load_tokenizer(folder, {"model_type": "llama", **ids})


def test_logprob_stream_follows_the_lagging_detokenizer(small_default):
    """The default model's BPE detokenizer shows a token's text only once the next word
    starts, and drops the first space: entries go out once their text is sent, with the
    text's offsets; a stop string drops the tokens reaching past it."""
    from mlxq.server.logprob_stream import LogprobStream
    from mlxq.server.token_bytes import TokenBytes

    _, tokenizer = small_default
    ids = tokenizer.encode(" héllo — 日本 is here", add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    for stop_at in (None, "日本"):
        stream, detokenizer, released, text = LogprobStream(token_bytes), \
            tokenizer.detokenizer, [], ""
        for n, token in enumerate(ids):
            stream.add(token, logprob=-float(n), top=[])
            detokenizer.add_token(token)
            text = detokenizer.text
            if stop_at and stop_at in text:
                released += stream.release(text, text.index(stop_at), stopped=True)
                text = text[:text.index(stop_at)]
                break
            held = max((k for k in range(1, len(stop_at or "")) if text.endswith(stop_at[:k])),
                       default=0)  # what the scheduler holds back: a stop string's start
            released += stream.release(text, len(text) - held)
            # Never ahead of the text: every released token's bytes are in it.
            assert len(b"".join(bytes(e["bytes"]) for e in released).decode(
                errors="ignore").lstrip()) <= len(text)
        else:
            detokenizer.finalize()
            text = detokenizer.text
            released += stream.release(text, len(text), final=True)
        assert [e["logprob"] for e in released] == [-float(n) for n in range(len(released))]
        spelled = b"".join(bytes(e["bytes"]) for e in released).decode().lstrip()
        assert spelled == (text.rstrip() if stop_at else text), (spelled, text, released)
        for e in released:
            if "\ufffd" not in e["token"]:  # the first token's space is dropped
                token = e["token"] if e["offset"] else e["token"].lstrip()
                assert text[e["offset"]:].startswith(token), (e, text)


def test_token_bytes_spell_characters_split_across_tokens(small_default, tiny_random,
                                                          tmp_path):
    """Byte-level BPE and SentencePiece byte fallback split characters: such a token's
    text is U+FFFD but its bytes are exact, so the bytes of a text's tokens join to the
    text's UTF-8."""
    from mlxq.server.token_bytes import TokenBytes

    text = "héllo — ünïcode 日本\n\n  x"
    kinds = []
    for tokenizer in (small_default[1], tiny_random[1], spm_tokenizer(tmp_path / "spm")):
        token_bytes = TokenBytes(tokenizer)
        kinds.append(token_bytes.kind)
        pieces = [token_bytes(i) for i in tokenizer.encode(text, add_special_tokens=False)]
        space = b" " if token_bytes.kind == "spm" else b""  # SentencePiece's prefix space
        assert b"".join(data for _, data in pieces) == space + text.encode()
        assert all(t == data.decode(errors="replace") for t, data in pieces)
        if tokenizer is not tiny_random[1]:
            assert any(t == "\ufffd" for t, _ in pieces)
    assert kinds == ["bpe", "bpe", "spm"]


# --- soak ---------------------------------------------------------------------------------------------
def test_soak_200_requests_memory_bounded_by_prefix_cache(tiny_random):
    cache_bound = 8 * MB
    server = make_server(tiny_random, kv_options={"kv_bits": 4},
                         prompt_cache_bytes=cache_bound, prompt_cache_size=50)

    def ask(i):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": f"Request {i}: the number {i * 37 % 101} is", "max_tokens": 3,
            "temperature": 0.7, "seed": i, "stream": i % 2 == 0})
        return r.status_code

    with running(server) as url:
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(ask, range(20))) == {200}
            base = wait_idle(url)
            assert set(pool.map(ask, range(20, 220))) == {200}
        end = wait_idle(url)
    assert end["requests_finished"] == 220
    assert end["prefix_cache_bytes"] <= cache_bound
    growth = end["mlx_active_memory"] - base["mlx_active_memory"]
    assert growth <= cache_bound, (base, end)


def test_parse_chat_developer_role_and_text_parts():
    served = ServedModel(id="m", context_length=100, vocab_size=10)
    seen = []
    params = parse_chat({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                       "text": "b"}]}],
        "max_completion_tokens": 95}, served, lambda m: seen.append(m) or [1] * 10)
    assert seen == [[{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "ab"}]]
    assert params.max_tokens == 91  # clamped to the context: 100 - 10 + 1


# --- the command line -------------------------------------------------------------------------------
def test_command_line_serves_and_stops_on_ctrl_c(hf_checkpoint):
    import os
    import re
    import signal
    import subprocess
    import sys

    folder, _, _ = hf_checkpoint(hidden_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=512)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxq.server", "--model", str(folder), "--port", "0",
         "--kv-bits", "4", "--max-kv-memory", "1GB"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        r = httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"model": str(folder), "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)  # 130: the conventional Ctrl-C exit
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_command_line_errors_are_one_line(capsys):
    from mlxq.server.__main__ import main
    from mlxq.server.background import bind_socket

    taken = bind_socket("127.0.0.1", 0)
    taken.listen()  # a port in use: another server listens on it
    try:
        port = str(taken.getsockname()[1])
        for argv, message in ((["--port", "70000"], "--port must be at most 65535"),
                              (["--decode-concurrency", "0"], "--decode-concurrency must be"),
                              (["--kv-bits", "4", "--kv-recent", "-1"],
                               "--kv-recent must be at least 0"),
                              (["--kv-recent", "8"], "applies to a quantized KV cache only"),
                              (["--port", port], "cannot listen on 127.0.0.1:" + port)):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("mlxq.server: error: ") and message in err, err
            assert err.count("\n") == 1
    finally:
        taken.close()
