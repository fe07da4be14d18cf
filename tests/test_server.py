"""The OpenAI-compatible server, driven by the real ``openai`` client against a tiny model served in-process.

The model is a tiny random Llama (hidden 64) saved with the tiny in-process chat tokenizer of conftest.py, loaded through ``KangarooModel.from_pretrained`` like any model folder; its deep layers are
damped and the adapter passes its input through, so drafts are often accepted and rounds commit
several tokens (the streaming path then sees multi-token steps).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import fastapi  # noqa: F401,E402  (the dev extra installs the server stack: a missing one must fail, not skip)
import httpx  # noqa: E402
import openai  # noqa: E402

from conftest import tiny_tokenizer  # noqa: E402
from tiny import damp_deep_layers, passthrough_adapter  # noqa: E402

from kangaroo.api import KangarooModel  # noqa: E402
from kangaroo.server import ServerThread, create_app  # noqa: E402

MODEL = "tiny-kangaroo"
KEY = "test-key"
CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, initializer_range=0.25, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    damp_deep_layers(model, 2)  # so that a pass-through adapter drafts well
    out = tmp_path_factory.mktemp("tiny_chat_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def km(model_dir):
    km = KangarooModel.from_pretrained(str(model_dir), adapter="random", exit_layer=2, max_steps=4, threshold=0.0)
    passthrough_adapter(km.adapter)
    return km


@pytest.fixture(scope="module")
def server(km):
    with ServerThread(create_app(km, MODEL, api_key=KEY, default_max_tokens=24)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three marsupials 🦘."}]


# ---------------------------------------------------------------------------------------------- happy paths

def test_greedy_chat_equals_plain_greedy_text(client, km):
    expected = km.generate(MESSAGES, 20, kangaroo=False)  # plain autoregressive greedy
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == expected.result.new_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    stats = resp.model_extra["kangaroo"]
    assert set(stats) >= {"compression_rate", "acceptance_rate", "drafted", "accepted"}
    assert stats["accepted"] > 0 and stats["compression_rate"] > 1

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["kangaroo"]["drafted"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.result.new_tokens
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1  # really streamed



def test_a_following_turn_reports_the_prompt_it_reused(client, km):
    """A chat's next turn begins with its previous request's prompt, even with another client's
    request between them (--prompt-slots): where the engine can reuse it exactly
    (kangaroo.decoding.PromptCache) the usage says how many tokens it skipped, and the answer is still
    plain greedy decoding's."""
    first = [{"role": "system", "content": "Answer from this note. " + "The quokka lives on Rottnest Island. " * 4},
             {"role": "user", "content": "Where does the quokka live?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=8, temperature=0)
    other = [{"role": "system", "content": "Answer from this note. " + "The wombat digs long burrows in the bush. " * 4},
             {"role": "user", "content": "What does the wombat dig?"}]
    client.chat.completions.create(model=MODEL, messages=other, max_tokens=8, temperature=0)  # another client between turns
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And what does it eat, in one short sentence?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=second, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == km.generate(second, 8, kangaroo=False).text
    cached = r2.usage.prompt_tokens_details.cached_tokens
    if km.engine.prompt_reuse_key(r2.usage.prompt_tokens) is None:
        assert cached == 0
    else:
        assert 32 <= cached <= r1.usage.prompt_tokens
        print(f"reused {cached} of {r2.usage.prompt_tokens} prompt tokens")

def test_greedy_completion_equals_plain_greedy_text(client, km):
    prompt = "Once upon a time, 从前 there was a"
    expected = km.generate(prompt, 16, chat=False, kangaroo=False).text
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert resp.choices[0].text == expected and resp.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert streamed == expected


def test_seeded_sampling_stop_and_models(client, km, server):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
    assert a == b == km.generate(MESSAGES, 20, temperature=0.9, top_p=0.95, seed=7).text
    # stop: cut before the first occurrence of a stop string, finish_reason "stop"
    full = km.generate(MESSAGES, 20).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                         stop=[stop, "never-there"], stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=stop)
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert text == full[: full.index(stop)] and finish == ["stop"]
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


# ---------------------------------------------------------------------------------------------- errors

BAD = [
    # (path, body, status, param)
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "seed": 2**70}, 400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES}, 400, "model"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}, 404, "model"),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 300}, 400, "prompt"),  # longer than the context
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "stream": True, "max_tokens": 10**6}, 400, "max_tokens"),
]


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        for path, body, status, param in BAD:
            assert_openai_error(http.post(path, json=body), status, param)
        assert_openai_error(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
        assert_openai_error(http.get("/v1/nowhere"), 404)
        assert_openai_error(http.get("/v1/chat/completions"), 405)
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                                       headers=auth), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed for health checks
    # the openai client maps them to its exceptions
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # and the server still answers
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    assert resp.usage.completion_tokens == 5 or resp.choices[0].finish_reason == "stop"


def test_a_client_that_leaves_mid_stream_does_not_block_the_others(client, server, monkeypatch):
    worker = server.app.state.worker
    abandoned = worker.abandoned
    engine = worker.km.engine
    slow = engine.run_layers

    def run_layers(*args, **kwargs):  # 10 ms a call: the 200-token answer cannot end before the client has left
        time.sleep(0.01)
        return slow(*args, **kwargs)

    monkeypatch.setattr(engine, "run_layers", run_layers)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # leave after the first chunk
    start = time.perf_counter()
    resp = client.completions.create(model=MODEL, prompt="Twice", max_tokens=4, temperature=0)
    assert resp.usage.completion_tokens >= 1
    assert time.perf_counter() - start < 30
    assert worker.abandoned == abandoned + 1  # the abandoned generation was stopped, not run to the end


# ---------------------------------------------------------------------------------------------- load

def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _request(client, spec: dict) -> str:
    kind, stream, kw = spec["kind"], spec["stream"], spec["kw"]
    if kind == "chat":
        out = client.chat.completions.create(model=MODEL, stream=stream, **kw)
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream else out.choices[0].message.content
    out = client.completions.create(model=MODEL, stream=stream, **kw)
    return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text


SPECS = [
    {"kind": kind, "stream": stream, "kw": kw}
    for i in range(5)
    for kind, stream, kw in [
        ("chat", i % 2 == 0, {"messages": [{"role": "user", "content": f"Question {i}: why do kangaroos hop? 🦘"}],
                              "max_tokens": 8 + i, "temperature": 0}),
        ("chat", i % 2 == 1, {"messages": [{"role": "user", "content": f"Tell story number {i}."}],
                              "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": i}),
        ("completion", i % 2 == 0, {"prompt": f"{i} little 袋鼠 went", "max_tokens": 9, "temperature": 0}),
        ("completion", i % 2 == 1, {"prompt": f"Recipe {i}:", "max_tokens": 7, "temperature": 1.0, "seed": 100 + i}),
    ]
]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RSS is read from /proc")
def test_concurrent_clients_get_the_answers_they_get_alone(client):
    alone = [_request(client, spec) for spec in SPECS]  # served one at a time (also warms up)
    for _ in range(2):
        [_request(client, spec) for spec in SPECS]
    rss_before = _rss_mb()
    clients, per_client = 8, 25
    errors: list[str] = []
    mismatches: list[tuple] = []

    def run(c: int) -> None:
        own = openai.OpenAI(base_url=client.base_url, api_key=KEY, max_retries=0, timeout=120)
        for j in range(per_client):
            k = (c * 7 + j) % len(SPECS)
            try:
                answer = _request(own, SPECS[k])
            except Exception as exc:  # noqa: BLE001 - every failure counts
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if answer != alone[k]:
                mismatches.append((k, answer, alone[k]))

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    rss_after = _rss_mb()
    print(f"{clients}x{per_client} requests in {elapsed:.1f}s; RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert errors == []
    assert mismatches == []
    assert rss_after - rss_before < 50, f"RSS grew {rss_after - rss_before:.0f} MB"


# ---------------------------------------------------------------------------------------------- CLI

def test_serve_binds_to_localhost_by_default():
    from kangaroo.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.prompt_slots) == ("127.0.0.1", 8000, None, 4)


def test_bad_prompt_slots_are_one_line(capsys, model_dir):
    from kangaroo.cli import main

    assert main(["serve", "--model", str(model_dir), "--prompt-slots", "0"]) == 2
    assert capsys.readouterr().err.strip() == "kangaroo: error: --prompt-slots must be > 0, got 0"


def test_missing_fastapi_is_a_clear_error(monkeypatch):
    from kangaroo.errors import KangarooError
    from kangaroo.server import _require_server_deps

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    with pytest.raises(KangarooError, match=r"pip install 'kangaroo-decoding\[server\]'"):
        _require_server_deps()


def test_kangaroo_serve_command(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = ["--dtype", "float32", "--kernel", "stock"]  # fixed, so both processes run the same products
    cmd = [sys.executable, "-m", "kangaroo.cli", "serve", "--model", str(model_dir), "--adapter", "random",
           "--port", str(port), "--threads", "1", *engine]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.25)
        assert health.json()["status"] == "ok"
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        name = c.models.list().data[0].id
        out = c.completions.create(model=name, prompt="Hi there", max_tokens=12, temperature=0)
        expected = KangarooModel.from_pretrained(str(model_dir), adapter="random", dtype="float32", kernel="stock",
                                                 threads=1).generate("Hi there", 12, chat=False)
        assert expected.text and out.choices[0].text == expected.text
        assert out.usage.completion_tokens == expected.result.new_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)
