"""chat_web: the page's SSE endpoint, the OpenAI-compatible API (through the official openai client),
input limits, the worker pool under concurrency and client disconnects, and the command line. Servers
are real uvicorn instances on loopback ports: a tiny GPT loaded from a fixture checkpoint, and
EchoChatModel (conftest) where a test needs a known reply with a tool call."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
import torch.nn as nn

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.engine import Engine, ReplyParser
from nanochat.gpt import GPT, GPTConfig
from nanochat.serve.app import create_app
from nanochat.serve.openai_api import Defaults, openai_text_as_parts, part_as_openai_text
from nanochat.serve.replicas import Worker, load_workers
from nanochat.tools.registry import ToolRegistry
from scripts.chat_web import main

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e '.[dev]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# servers

@pytest.fixture(scope="module")
def sft_dir(tiny_base_dir, tmp_path_factory):
    """A base dir holding a tiny SFT checkpoint (depth 1, width 64, context 128, byte-level vocab)."""
    root = tmp_path_factory.mktemp("chat_web") / "base"
    root.mkdir()
    os.symlink(os.path.join(tiny_base_dir, "tokenizer"), root / "tokenizer")
    config = GPTConfig(sequence_len=128, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # untrained zero-init projections would make every reply a function of one token
        for block in model.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        nn.init.normal_(model.lm_head.weight, std=0.1)
    save_checkpoint(str(root / "chatsft_checkpoints" / "d1"), 3, model.state_dict(), None,
                    {"step": 3, "model_config": dataclasses.asdict(config)})
    return str(root)


@pytest.fixture(scope="module")
def gpt(sft_dir, serve_app):
    """The fixture checkpoint loaded the way main() loads it, one CPU worker, greedy by default."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", sft_dir)
        workers, _ = load_workers("sft", "cpu")
    app = create_app(workers, "nanochat-test", defaults=Defaults(temperature=0.0, top_k=50, max_tokens=32))
    with serve_app(app) as url:
        yield SimpleNamespace(url=url, worker=workers[0], tokenizer=workers[0].tokenizer, pool=app.state.pool,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0))


@pytest.fixture(scope="module")
def echo(byte_tokenizer, serve_app, echo_chat_model):
    """Two EchoChatModel workers, 10 ms per token."""
    models = [echo_chat_model(byte_tokenizer, delay=0.01) for _ in range(2)]
    app = create_app([Worker(i, m, byte_tokenizer) for i, m in enumerate(models)], "nanochat-echo")
    with serve_app(app) as url:
        yield SimpleNamespace(url=url, models=models, tokenizer=byte_tokenizer,
                              client=openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0))


@pytest.fixture
def slow(byte_tokenizer, serve_app, echo_chat_model):
    """One EchoChatModel worker at 20 ms per token that decodes one request at a time (max_batch 1): long
    replies take seconds, and a second request waits (disconnect and queue tests)."""
    model = echo_chat_model(byte_tokenizer, delay=0.02)
    app = create_app([Worker(0, model, byte_tokenizer, max_batch=1)], "nanochat-slow")
    with serve_app(app) as url:
        yield SimpleNamespace(url=url, model=model)


def page_events(url, body, timeout=60):
    """POST /chat/completions and return its events (the parsed `data:` lines)."""
    events = []
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def reference(gpt, messages, max_tokens):
    """What the engine itself generates, greedy: (prompt ids, generated ids including a stop token, stopped)."""
    prompt = gpt.tokenizer.render_for_completion(messages)
    engine = Engine(gpt.worker.model, gpt.tokenizer, tools=ToolRegistry())
    tokens = [col[0] for col, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=0.0)]
    stopped = bool(tokens) and tokens[-1] in engine.stop_tokens
    return prompt, tokens, stopped


def as_text(events):
    """A page stream's text and tool parts, written as in OpenAI content (tool parts between their markers)."""
    return "".join(part_as_openai_text(e["type"], e["text"]) for e in events
                   if e["type"] in ("text", "python", "python_output"))


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def stats(url):
    return httpx.get(url + "/stats").json()


# ---------------------------------------------------------------------------------------------
# page, health, models

def test_page_health_models(gpt):
    r = httpx.get(gpt.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for needle in ('id="messages"', 'id="input"', 'id="new-chat"', "/chat/completions", "<script>", "<style>"):
        assert needle in page
    # self-contained: nothing fetched from anywhere else
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page
    assert httpx.get(gpt.url + "/health").json() == {"status": "ok", "model": "nanochat-test", "workers": 1,
                                                     "idle_workers": 1, "queue_depth": 0}
    assert [m.id for m in gpt.client.models.list()] == ["nanochat-test"]
    s = stats(gpt.url)
    assert s["model"] == "nanochat-test" and len(s["workers"]) == 1 and s["workers"][0]["device"] == "cpu"
    assert s["queue_depth"] == 0 and s["requests_active"] == 0


# ---------------------------------------------------------------------------------------------
# the openai client against a real checkpoint

def test_openai_client_non_streaming(gpt):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    before = stats(gpt.url)
    resp = gpt.client.chat.completions.create(model="whatever", messages=messages, temperature=0, max_tokens=24)
    prompt, tokens, stopped = reference(gpt, messages, 24)
    text_tokens = tokens[:-1] if stopped else tokens
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == "nanochat-test" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == gpt.tokenizer.decode(text_tokens) and choice.message.content
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == len(tokens)
    assert resp.usage.total_tokens == len(prompt) + len(tokens)
    after = stats(gpt.url)
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["tokens_generated"] == before["tokens_generated"] + len(tokens)
    assert after["tokens_per_second"] > 0


def test_openai_client_streaming(gpt):
    messages = [{"role": "user", "content": "Tell me about the river"}]
    stream = gpt.client.chat.completions.create(model="nanochat-test", messages=messages, temperature=0, max_tokens=20,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    prompt, tokens, stopped = reference(gpt, messages, 20)
    assert all(c.object == "chat.completion.chunk" and c.model == "nanochat-test" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3  # token by token, not one blob
    assert "".join(deltas) == gpt.tokenizer.decode(tokens[:-1] if stopped else tokens)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if stopped else "length"]
    assert chunks[-1].choices == []  # the usage chunk comes last
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(prompt), len(tokens))
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_client_sampling_options(gpt):
    messages = [{"role": "user", "content": "Once upon a time"}]
    kw = dict(model="nanochat-test", messages=messages, max_tokens=24)

    def reply(**more):
        return gpt.client.chat.completions.create(**kw, **more).choices[0].message.content

    a, b, c = reply(temperature=1.0, seed=5), reply(temperature=1.0, seed=5), reply(temperature=1.0, seed=6)
    assert a == b and a != c  # seeded sampling is reproducible, and the seed matters
    greedy = reply(temperature=0)
    assert reply(temperature=1.5, extra_body={"top_k": 1}) == greedy  # top_k (a non-OpenAI field) is honoured
    assert reply(temperature=0, top_p=0.5) == greedy  # top_p is accepted, and ignored (documented)
    resp = gpt.client.chat.completions.create(model="nanochat-test", messages=messages, max_completion_tokens=3)
    assert resp.usage.completion_tokens <= 3


# ---------------------------------------------------------------------------------------------
# tool calls, both endpoints

def test_page_stream_shows_tool_calls_and_takes_them_back(echo):
    events = page_events(echo.url, {"messages": [{"role": "user", "content": "hi"}]})
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and events[-1]["finish_reason"] == "stop"
    text_before = "".join(e["text"] for e in events[:kinds.index("python")] if e["type"] == "text")
    assert text_before == "You said: hi"
    assert kinds.count("text") > 10  # streamed a token at a time
    tools = [(e["type"], e["text"]) for e in events if e["type"] in ("python", "python_output")]
    assert tools == [("python", "6*7"), ("python_output", "42")]
    assert "".join(e["text"] for e in events[kinds.index("python_output"):] if e["type"] == "text") == " ok"
    expected_reply = echo.models[0].reply_tokens("hi")
    assert events[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": len(expected_reply),
                                   "total_tokens": 6 + len(expected_reply)}
    # the page sends the reply back as parts; the server renders them as the model's own tokens
    parts = [{"type": "text", "text": "You said: hi"}, {"type": "python", "text": "6*7"},
             {"type": "python_output", "text": "42"}, {"type": "text", "text": " ok"}]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts},
                    {"role": "user", "content": "again"}]
    events = page_events(echo.url, {"messages": conversation, "max_tokens": 5})
    assert events[-1]["usage"]["prompt_tokens"] == len(echo.tokenizer.render_for_completion(conversation))
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 5
    assert "".join(e["text"] for e in events if e["type"] == "text") == "You s"
    # the first turn's reply, rendered in the conversation, is exactly what the model generated
    first = echo.tokenizer.render_for_completion(conversation[:1])
    ids, _ = echo.tokenizer.render_conversation(conversation[:2])
    assert ids == first + expected_reply


def test_openai_tool_markers_round_trip(echo):
    resp = echo.client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    content = resp.choices[0].message.content
    assert content == "You said: hi<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> ok"
    assert resp.choices[0].finish_reason == "stop"
    assert openai_text_as_parts(content) == [{"type": "text", "text": "You said: hi"}, {"type": "python", "text": "6*7"},
                                             {"type": "python_output", "text": "42"}, {"type": "text", "text": " ok"}]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content},
                    {"role": "user", "content": [{"type": "text", "text": "more"}]}]
    resp = echo.client.chat.completions.create(model="x", messages=conversation, max_tokens=4)
    as_parts = [conversation[0], {"role": "assistant", "content": openai_text_as_parts(content)},
                {"role": "user", "content": "more"}]
    assert resp.usage.prompt_tokens == len(echo.tokenizer.render_for_completion(as_parts))
    assert resp.choices[0].message.content == "You " and resp.choices[0].finish_reason == "length"


def test_two_workers_share_the_load(echo):
    before = [w["requests"] for w in stats(echo.url)["workers"]]
    results = [None] * 6

    def client(i):
        results[i] = page_events(echo.url, {"messages": [{"role": "user", "content": f"n{i}"}]})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, events in enumerate(results):
        assert "".join(e["text"] for e in events if e["type"] == "text").startswith(f"You said: n{i}")
    after = [w["requests"] for w in stats(echo.url)["workers"]]
    assert sum(after) - sum(before) == 6
    assert all(a > b for a, b in zip(after, before))  # both replicas served some


# ---------------------------------------------------------------------------------------------
# limits: 4xx with a message naming the limit, and the server keeps serving

USER = [{"role": "user", "content": "hi"}]


def alternating(n, chars=2):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * chars} for i in range(n)]


BAD = [  # (body, status, text the error message must contain)
    ({"messages": alternating(501)}, 400, "--max-messages"),
    ({"messages": [{"role": "user", "content": "x" * 1_000_000}]}, 400, "--max-message-chars"),  # a 1 MB message
    ({"messages": alternating(5, chars=7000)}, 400, "--max-total-chars"),
    ({"messages": USER, "temperature": 2.5}, 400, "--max-temperature"),
    ({"messages": USER, "temperature": -0.1}, 400, "--max-temperature"),
    ({"messages": USER, "top_k": 201}, 400, "--max-top-k"),
    ({"messages": USER, "top_k": -1}, 400, "--max-top-k"),
    ({"messages": USER, "max_tokens": 0}, 400, "--max-max-tokens"),
    ({"messages": USER, "max_tokens": 5000}, 400, "--max-max-tokens"),
    ({"messages": USER, "seed": -1}, 400, "seed"),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"messages": USER, "logit_bias": {"1": 2}}, 400, "unknown field 'logit_bias'"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "unknown field 'messages[0].name'"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}, 400, "alternate"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "hi"}]}, 400, "system"),
    ({"messages": alternating(2)}, 400, "last message must be the user's"),
    ({"messages": []}, 400, "empty"),
    ({}, 400, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "y" * 200}]}, 400, "context"),  # 200 tokens > context 128
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
]


@pytest.mark.parametrize("endpoint", ["/chat/completions", "/v1/chat/completions"])
def test_bad_requests_are_refused_and_the_server_keeps_serving(gpt, endpoint):
    with httpx.Client(base_url=gpt.url, timeout=30) as http:
        for body, status, needle in BAD:
            r = http.post(endpoint, json=body)
            assert r.status_code == status, (body, r.text)
            assert needle in r.json()["error"]["message"], (needle, r.text)
        # not JSON at all, and a body over the byte limit
        r = http.post(endpoint, content=b'{"messages": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        r = http.post(endpoint, content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
        # still serving
        assert http.get("/health").json()["status"] == "ok"
        r = http.post(endpoint, json={"messages": USER, "max_tokens": 3})
        assert r.status_code == 200
    s = stats(gpt.url)
    assert s["queue_depth"] == 0 and s["requests_active"] == 0 and s["requests_failed"] == 0


def test_openai_only_limits_and_client_errors(gpt):
    for body, needle in [({"messages": USER, "n": 9}, "n must be between 1 and 8"),
                         ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop has 5 strings"),
                         ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
                         ({"messages": USER, "top_logprobs": 2}, "needs logprobs"), ({"messages": USER, "top_p": 0}, "top_p"),
                         ({"messages": USER, "max_tokens": 3, "max_completion_tokens": 3}, "not both"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "content")]:
        r = httpx.post(gpt.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match="--max-temperature"):
        gpt.client.chat.completions.create(model="m", messages=USER, temperature=3)
    with pytest.raises(openai.BadRequestError, match="--max-message-chars"):
        gpt.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "z" * 9000}], stream=True)


# ---------------------------------------------------------------------------------------------
# concurrency and disconnects

def test_sixteen_streaming_clients_all_complete(gpt):
    before = stats(gpt.url)
    prompts = [f"Question number {i % 4}" for i in range(16)]
    expected = {}
    for p in set(prompts):
        _, tokens, stopped = reference(gpt, [{"role": "user", "content": p}], 40)
        expected[p] = (gpt.tokenizer.decode(tokens[:-1] if stopped else tokens), len(tokens))
    results, errors = [None] * 16, []
    barrier = threading.Barrier(16)

    def client(i):
        try:
            barrier.wait()
            results[i] = page_events(gpt.url, {"messages": [{"role": "user", "content": prompts[i]}],
                                               "max_tokens": 40, "temperature": 0})
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i, events in enumerate(results):
        assert events[-1]["type"] == "done"
        assert (as_text(events), events[-1]["usage"]["completion_tokens"]) == expected[prompts[i]]
    # one worker for 16 clients: decoded together as one batch (each row still equals the request alone)
    after = stats(gpt.url)
    assert after["workers"][0]["peak_batch_size"] > 4
    assert after["queue_depth"] == 0 and after["requests_active"] == 0 and not after["workers"][0]["busy"]
    assert after["requests_served"] == before["requests_served"] + 16


def test_disconnect_mid_stream_frees_the_worker(slow):
    body = {"messages": [{"role": "user", "content": "w" * 150}]}  # ~175 tokens: 3.5 s at 20 ms each
    with httpx.stream("POST", slow.url + "/chat/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith('data: {"type": "text"')
            if seen == 3:
                break
    # leaving the `with` closed the connection
    assert wait_for(lambda: stats(slow.url)["requests_cancelled"] == 1, timeout=3)
    s = stats(slow.url)
    assert s["requests_active"] == 0 and not s["workers"][0]["busy"]
    calls = slow.model.calls
    time.sleep(0.2)
    assert slow.model.calls == calls < 40  # it stopped generating, long before the reply's end
    events = page_events(slow.url, {"messages": USER})  # and serves the next client at once
    assert events[-1]["type"] == "done"


def test_disconnects_while_queued_and_non_streaming(slow):
    long = {"messages": [{"role": "user", "content": "w" * 150}]}
    with httpx.Client(base_url=slow.url, timeout=30) as a, httpx.Client(base_url=slow.url, timeout=30) as b:
        with a.stream("POST", "/chat/completions", json=long) as ra:
            lines_a = ra.iter_lines()  # kept: dropping an httpx line iterator closes the connection
            next(lines_a)  # A holds the only worker
            with b.stream("POST", "/chat/completions", json={"messages": USER}) as rb:
                lines_b = rb.iter_lines()
                assert json.loads(next(lines_b)[6:]) == {"type": "queued", "position": 1}
                assert stats(slow.url)["queue_depth"] == 1
            # B left while waiting: out of the queue, and A goes on
            assert wait_for(lambda: stats(slow.url)["queue_depth"] == 0)
            assert stats(slow.url)["requests_active"] == 1
    assert wait_for(lambda: stats(slow.url)["requests_active"] == 0)
    # a non-streaming client that gives up: noticed within a second or so
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/chat/completions", json=long, timeout=0.5)
    # cancelled: B (left while queued), A (closed mid-reply), and this one
    assert wait_for(lambda: stats(slow.url)["requests_cancelled"] == 3, timeout=3)
    calls = slow.model.calls
    time.sleep(0.2)
    assert slow.model.calls == calls
    s = stats(slow.url)
    assert s["queue_depth"] == 0 and s["requests_active"] == 0 and s["requests_served"] == 0


def test_generation_errors_reach_the_client_and_the_server_recovers(byte_tokenizer, echo_chat_model, serve_app):
    class Failing(echo_chat_model):
        """Raises on the fourth forward (after writing "You") while `fail` is set."""
        fail = True

        def forward(self, idx, kv_cache=None, logits_at=None):
            if self.fail and idx.size(1) == 1 and self.step >= 2:
                raise RuntimeError("boom")
            return super().forward(idx, kv_cache, logits_at)

    model = Failing(byte_tokenizer)
    with serve_app(create_app([Worker(0, model, byte_tokenizer)], "failing")) as url:
        events = page_events(url, {"messages": USER})
        assert [e["type"] for e in events] == ["text"] * 3 + ["error"]
        assert "".join(e["text"] for e in events[:3]) == "You" and "RuntimeError: boom" in events[-1]["message"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="boom"):
            client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(openai.APIError, match="boom"):
            list(client.chat.completions.create(model="m", messages=USER, stream=True))
        model.fail = False
        assert client.chat.completions.create(model="m", messages=USER).choices[0].finish_reason == "stop"
        s = stats(url)
        assert (s["requests_failed"], s["requests_served"], s["requests_active"]) == (3, 1, 0)


# ---------------------------------------------------------------------------------------------
# command line

def test_main_without_a_checkpoint_says_what_to_run(base_dir, capsys):
    assert main(["-i", "rl", "--device-type", "cpu"]) == 1
    assert "scripts.chat_rl" in capsys.readouterr().err


def test_main_serves_the_checkpoint(sft_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "NANOCHAT_BASE_DIR": sft_dir}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--port", str(port),
                             "--max-tokens", "8"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # stop waiting if it died
        assert wait_for(up, timeout=90) and proc.poll() is None, proc.communicate(timeout=5)
        assert httpx.get(url + "/health").json()["model"] == "nanochat-sft-d1"
        assert "<textarea" in httpx.get(url + "/").text
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        resp = client.chat.completions.create(model="nanochat-sft-d1", messages=USER)
        assert resp.usage.completion_tokens <= 8  # the --max-tokens default applies
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# reply parsing

def test_reply_parser_events_add_up_to_what_the_model_wrote(byte_tokenizer):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    S = byte_tokenizer.encode_special
    specials = [S(n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|user_start|>")]
    pieces = byte_tokenizer.encode("a+1 é€🎉") + [0xFF, 0xE2]  # ASCII, multi-byte characters, bytes that never decode

    @hypothesis.given(st.lists(st.sampled_from(pieces + specials), max_size=40))
    @hypothesis.settings(max_examples=300, deadline=None)
    def check(tokens):
        parser = ReplyParser(byte_tokenizer)
        events = [e for t in tokens for e in parser.push(t)] + parser.finish()
        assert as_text(events) == byte_tokenizer.decode(tokens)
        assert all(e["text"] for e in events if e["type"] == "text")  # no empty deltas

    check()
    # a finished call and its output are parts; an unfinished one stays text, marker included
    parser = ReplyParser(byte_tokenizer)
    tokens = [S("<|python_start|>")] + byte_tokenizer.encode("2+3") + [S("<|python_end|>"), S("<|output_start|>")] \
        + byte_tokenizer.encode("5") + [S("<|output_end|>"), S("<|python_start|>")] + byte_tokenizer.encode("4*")
    events = [e for t in tokens for e in parser.push(t)] + parser.finish()
    assert events == [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                      {"type": "text", "text": "<|python_start|>4*"}]


# ---------------------------------------------------------------------------------------------
# the OpenAI surface: n, stop, logprobs, top_p, penalties, usage, /v1/completions, adapters by model, /metrics

def test_openai_n_choices_are_seeded_rows(gpt):
    kw = dict(model="m", messages=USER, temperature=1.0, max_tokens=12)
    both = gpt.client.chat.completions.create(n=2, seed=5, **kw)
    one = [gpt.client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (5, 6)]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == one
    assert both.usage.completion_tokens == sum(
        gpt.client.chat.completions.create(seed=s, **kw).usage.completion_tokens for s in (5, 6))
    chunks = list(gpt.client.chat.completions.create(n=2, seed=5, stream=True, stream_options={"include_usage": True}, **kw))
    streamed = ["", ""]
    for c in chunks:
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == one
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == both.usage.completion_tokens


def test_openai_stop_strings(echo):
    # the echo reply is "You said: <msg><|python_start|>6*7..."; a stop string ends it where it begins
    for stop in (["said"], ["zzz", ": hel"]):
        resp = echo.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], stop=stop)
        assert resp.choices[0].message.content == ("You " if stop == ["said"] else "You said")
        assert resp.choices[0].finish_reason == "stop"
        chunks = list(echo.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}],
                                                          stop=stop, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_logprobs_top_p_and_penalties(gpt):
    prompt, tokens, stopped = reference(gpt, USER, 10)
    resp = gpt.client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=10, logprobs=True,
                                              top_logprobs=3)
    entries = resp.choices[0].logprobs.content
    assert len(entries) == len(tokens) - stopped  # every token but the stop token
    for e, tok in zip(entries, tokens):
        assert bytes(e.bytes) == gpt.tokenizer.enc.decode_single_token_bytes(tok)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: the best
        assert e.logprob <= 0
    plain = gpt.client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None
    nucleus = gpt.client.chat.completions.create(model="m", messages=USER, temperature=1.5, top_p=1e-6, seed=1,
                                                 max_tokens=10)
    assert nucleus.choices[0].message.content == plain.choices[0].message.content  # only the best token is left
    penalized = gpt.client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=10,
                                                   frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized.choices[0].finish_reason in ("stop", "length")


def test_openai_text_completions(gpt):
    tok = gpt.tokenizer
    prompt = [tok.get_bos_token_id()] + tok.encode("The cat")
    engine = Engine(gpt.worker.model, tok, tools=ToolRegistry())
    want = [col[0] for col, _ in engine.generate(prompt, max_tokens=8, temperature=0.0)]
    stopped = want[-1] in engine.stop_tokens
    resp = gpt.client.completions.create(model="m", prompt="The cat", max_tokens=8, temperature=0, logprobs=2)
    choice = resp.choices[0]
    assert resp.object == "text_completion" and choice.text == tok.decode(want[:-1] if stopped else want)
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(want)
    assert len(choice.logprobs.tokens) == len(want) - stopped
    assert all(1 <= len(t) <= 2 for t in choice.logprobs.top_logprobs)  # keyed by text: two tokens may share one
    assert choice.logprobs.text_offset[0] == 0
    chunks = list(gpt.client.completions.create(model="m", prompt="The cat", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        gpt.client.completions.create(model="m", prompt=["a", "b"], max_tokens=2)


def live_app(sft_dir, adapters_root, quantize="none"):
    """The SFT checkpoint served greedily (16 tokens) with live learning on: -> (app, workers)."""
    import copy
    from nanochat.serve.live import LiveLearning
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", sft_dir)
        workers, _ = load_workers("sft", "cpu", quantize=quantize)
    trainer = copy.deepcopy(workers[0].model)
    app = create_app(workers, "nanochat-test", defaults=Defaults(temperature=0.0, top_k=50, max_tokens=16),
                     learn=lambda pool: LiveLearning(pool, trainer, workers[0].tokenizer, adapters_root))
    return app, workers


def test_adapter_chosen_by_model_and_metrics(sft_dir, serve_app, tmp_path):
    app, workers = live_app(sft_dir, str(tmp_path))
    lora = workers[0].lora
    ad = lora.add("facts", rank=4, alpha=8)
    with torch.no_grad():
        for p in ad.B:
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["nanochat-test", "facts"]
        by_model = client.chat.completions.create(model="facts", messages=USER)
        by_field = client.chat.completions.create(model="nanochat-test", messages=USER, extra_body={"adapter": "facts"})
        base = client.chat.completions.create(model="nanochat-test", messages=USER)
        assert by_model.model == "facts" and base.model == "nanochat-test"
        assert by_model.choices[0].message.content == by_field.choices[0].message.content
        assert by_model.choices[0].message.content != base.choices[0].message.content
        lora.activate("facts")  # the same adapter alone, through the engine
        prompt = workers[0].tokenizer.render_for_completion(USER)
        want = [col[0] for col, _ in Engine(workers[0].model, workers[0].tokenizer, tools=ToolRegistry()).generate(
            prompt, max_tokens=16, temperature=0.0)]
        lora.activate(None)
        assert by_model.usage.completion_tokens == len(want)
        with pytest.raises(openai.BadRequestError, match="give one"):
            client.chat.completions.create(model="facts", messages=USER, extra_body={"adapter": "none"})
        text = httpx.get(url + "/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['nanochat_requests_total{finish_reason="length"}'] + \
        samples.get('nanochat_requests_total{finish_reason="stop"}', 0) == 3
    assert samples["nanochat_generated_tokens_total"] == sum(
        r.usage.completion_tokens for r in (by_model, by_field, base))
    assert samples["nanochat_time_to_first_token_seconds_count"] == 3
    assert samples["nanochat_queue_length"] == 0 and "nanochat_batch_size" in samples


def test_adapter_stacks_through_the_api_and_provenance(sft_dir, serve_app, tmp_path):
    from nanochat.lora.storage import save_adapter
    from nanochat.lora.merge import merge_adapters
    app, workers = live_app(sft_dir, str(tmp_path))
    lora, tok = workers[0].lora, workers[0].tokenizer
    for seed, name in enumerate(("domain", "facts")):
        ad = lora.add(name, rank=4, alpha=8)
        with torch.no_grad():
            for p in ad.B:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        save_adapter(lora, name, str(tmp_path / name))
    merge_adapters(lora, ["domain", "facts"], "both", method="ties", density=0.5, weights=[1.0, 0.5])
    save_adapter(lora, "both", str(tmp_path / "both"))
    prompt = tok.render_for_completion(USER)

    def engine_reply(stack, weights=None):  # the stack active for the whole model, through the engine
        lora.activate(stack, weights)
        try:
            return [col[0] for col, _ in Engine(workers[0].model, tok, tools=ToolRegistry()).generate(prompt, max_tokens=16, temperature=0.0)]
        finally:
            lora.activate(None)

    stack, weights = ["domain", "facts"], [1.0, 0.5]
    want = engine_reply(stack, weights)
    assert want != engine_reply("domain") and want != engine_reply(None)  # the stack really is a third model
    for name in ("domain", "facts", "both"):
        lora.remove(name)  # the server loads them from disk when it starts, as it would after a restart
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        extra = {"adapter": stack, "adapter_weights": weights}
        chat = client.chat.completions.create(model="nanochat-test", messages=USER, extra_body=extra)
        assert chat.usage.completion_tokens == len(want)
        alone = client.chat.completions.create(model="nanochat-test", messages=USER, extra_body={"adapter": "domain"})
        assert chat.choices[0].message.content != alone.choices[0].message.content
        # the same stack on the text route and the page route: the same tokens
        text = client.completions.create(model="nanochat-test", prompt="The cat", max_tokens=8, temperature=0,
                                         extra_body=extra)
        lora.activate(stack, weights)
        text_want = [c[0] for c, _ in Engine(workers[0].model, tok, tools=ToolRegistry()).generate(
            [tok.get_bos_token_id()] + tok.encode("The cat"), max_tokens=8, temperature=0.0)]
        lora.activate(None)
        assert text.usage.completion_tokens == len(text_want)
        page = as_text(page_events(url, {"messages": USER, "adapter": stack, "adapter_weights": weights,
                                         "temperature": 0.0, "max_tokens": 16}))
        assert page == chat.choices[0].message.content
        # bad stacks: a clear 400 or 404, never a 500
        bad = [({"adapter": ["domain", "nope"]}, openai.NotFoundError, "nope"),
               ({"adapter": ["domain", "facts"], "adapter_weights": [1.0]}, openai.BadRequestError, "one weight"),
               ({"adapter": ["domain", "domain"]}, openai.BadRequestError, "twice"),
               ({"adapter": []}, openai.BadRequestError, "empty"),
               ({"adapter": ["none", "facts"]}, openai.BadRequestError, "base model"),
               ({"adapter_weights": [1.0]}, openai.BadRequestError, "needs adapter"),
               ({"adapter": ["domain"], "adapter_weights": [1e9]}, openai.BadRequestError, "weight"),
               ({"adapter": ["a"] * 9}, openai.BadRequestError, "limit is 8"),
               ({"adapter": [3]}, openai.BadRequestError, "adapter")]
        for body, error, match in bad:
            with pytest.raises(error, match=match):
                client.chat.completions.create(model="nanochat-test", messages=USER, extra_body=body)
        r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}], '
                       b'"adapter": ["domain"], "adapter_weights": [NaN]}', headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        r = httpx.post(url + "/chat/completions", json={"messages": USER, "adapter": ["facts"], "adapter_weights": [2, 3]})
        assert r.status_code == 400 and "one weight" in r.json()["error"]["message"]
        # /adapters and /v1/models show how the merged adapter came about
        listed = {a["name"]: a for a in httpx.get(url + "/adapters").json()["adapters"]}
        assert listed["both"]["provenance"] == {"merged_from": [{"name": "domain", "weight": 1.0},
                                                                {"name": "facts", "weight": 0.5}],
                                                "method": "ties", "density": 0.5}
        assert listed["domain"]["provenance"] is None
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert models["both"]["provenance"]["method"] == "ties"


def test_a_4bit_base_learns_and_serves_adapters(sft_dir, serve_app, tmp_path):
    """--quantize int4: every replica is a 4-bit base, live learning's trainer is a copy of it, so an adapter
    learned through /learn is bound to that base and served through the 4-bit layers."""
    from nanochat.lora.adapter import model_state_hash
    from nanochat.lora.quant import Int4Embedding, Int4Linear
    from scripts.chat_web import parse_args
    assert parse_args(["--quantize", "int4"]).quantize == "int4" and parse_args([]).quantize == "none"
    with pytest.raises(ValueError, match="quantize 'int3'"):
        load_workers("sft", "cpu", quantize="int3")
    app, workers = live_app(sft_dir, str(tmp_path), quantize="int4")
    model = workers[0].model
    assert isinstance(model.transformer.h[0].mlp.c_fc, Int4Linear) and isinstance(model.lm_head, Int4Linear)
    assert isinstance(model.transformer.wte, Int4Embedding) and not list(model.parameters())  # every matrix 4-bit
    assert workers[0].device == torch.device("cpu")
    live = app.state.live
    assert live.trainer.base_hash == workers[0].lora.base_hash == model_state_hash(model)
    ad = workers[0].lora.add("probe", rank=live.hparams["rank"])  # what one adapter takes, from the unpacked shapes
    assert live._adapter_bytes() == sum(p.numel() * 4 for p in ad.parameters())
    workers[0].lora.remove("probe")
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        base = client.chat.completions.create(model="nanochat-test", messages=USER).choices[0].message.content
        r = httpx.post(url + "/learn", json={"adapter": "facts", "steps": 8,
                                             "facts": [{"question": "hi", "answer": "zzzz qqqq zzzz"}]})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{url}/learn/{r.json()['job']}").json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["status"] == "done", job
        learned = client.chat.completions.create(model="facts", messages=USER).choices[0].message.content
        assert "facts" in [m.id for m in client.models.list().data]
    assert learned != base
    # saved bound to the 4-bit base: the full-precision checkpoint refuses it
    meta = json.load(open(tmp_path / "facts" / "adapter.json"))
    assert meta["base_hash"] == workers[0].lora.base_hash
    from nanochat.lora.adapter import AdapterBaseMismatch, LoRA
    from nanochat.lora.storage import load_adapter
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", sft_dir)
        plain, _ = load_workers("sft", "cpu")
    with pytest.raises(AdapterBaseMismatch):
        load_adapter(LoRA(plain[0].model), str(tmp_path / "facts"))
