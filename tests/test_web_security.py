"""chat_web under hostile or unlucky input: inputs that used to answer 500 (tiny temperatures, adapters
deleted under a request), corrupt adapters at startup, API keys, slow clients, and the bounds on /learn
jobs, adapters and leftover temp files. Servers are real uvicorn instances on loopback ports."""
import asyncio
import copy
import json
import os
import socket
import threading
import time

import httpx
import pytest
import torch

from nanochat.checkpoint_manager import remove_stale_temp as remove_stale_checkpoint_temp, save_checkpoint, start_fresh
from nanochat.gpt import GPT
from nanochat.lora.adapter import LoRA
from nanochat.lora.storage import list_adapters, remove_stale_temp, save_adapter
from nanochat.serve.app import create_app, serve_in_thread
from nanochat.serve.live import AdapterLimit, JobQueueFull, LearnJob, LiveLearning
from nanochat.serve.openai_api import Limits
from nanochat.serve.replicas import Job, Worker, WorkerPool
from nanochat.serve.security import check_exposure
from scripts.chat_web import main

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e '.[dev]')")

pytestmark = pytest.mark.usefixtures("one_thread")


def ask(url, content="hi", key=None, **fields):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"messages": [{"role": "user", "content": content}], **fields})


# ---------------------------------------------------------------------------------------------
# tiny temperatures

@pytest.fixture(scope="module")
def echo(byte_tokenizer, serve_app, echo_chat_model):
    app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "nanochat-echo")
    with serve_app(app) as url:
        yield url


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e-7])
def test_tiny_temperatures_sample_greedily(echo, temperature):
    # EchoChatModel's logits are +-30: 30 / 1e-300 overflows to inf, and softmax of infs is NaN.
    r = ask(echo, "tiny", temperature=temperature, max_tokens=64)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("You said: tiny")
    page = httpx.post(echo + "/chat/completions", json={"messages": [{"role": "user", "content": "tiny"}],
                                                        "temperature": temperature}, timeout=30)
    assert page.status_code == 200 and '"type": "error"' not in page.text and '"type": "done"' in page.text


# ---------------------------------------------------------------------------------------------
# adapters: corrupt files at startup, deletion under a request, bounds

@pytest.fixture
def gpt_worker(byte_tokenizer, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    model.init_weights()
    return model


def save_test_adapter(model, root, name, rank=2):
    """A real adapter of `model` (B random, so it changes the output) saved under root/name."""
    lora = LoRA(copy.deepcopy(model))
    ad = lora.add(name, rank=rank, seed=0)
    with torch.no_grad():
        for b in ad.B:
            b.normal_(std=0.5)
    save_adapter(lora, name, os.path.join(root, name))
    lora.close()


def make_live(model, tokenizer, root, **kw):
    pool_holder = {}

    def learn(pool):
        pool_holder["live"] = LiveLearning(pool, copy.deepcopy(model), tokenizer, root, **kw)
        return pool_holder["live"]
    return learn, pool_holder


def corrupt_adapters(model, root):
    """A good adapter plus every corruption the review tried, and leftovers of interrupted saves."""
    save_test_adapter(model, root, "good")
    for name in ("truncated", "garbage", "badrank", "strrank", "hugerank", "listjson", "badjson", "noweights",
                 "wrongshape"):
        save_test_adapter(model, root, name)
    d = lambda n: os.path.join(root, n)
    with open(os.path.join(d("truncated"), "adapter.safetensors"), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(d("garbage"), "adapter.safetensors"), "wb") as f:
        f.write(os.urandom(4096))
    for name, change in (("badrank", {"rank": -3}), ("strrank", {"rank": "8"}), ("hugerank", {"rank": 10 ** 9}),
                         ("wrongshape", {"rank": 4})):
        meta = json.load(open(os.path.join(d(name), "adapter.json")))
        json.dump(meta | change, open(os.path.join(d(name), "adapter.json"), "w"))
    json.dump([1, 2, 3], open(os.path.join(d("listjson"), "adapter.json"), "w"))
    open(os.path.join(d("badjson"), "adapter.json"), "w").write("{not json")
    os.remove(os.path.join(d("noweights"), "adapter.safetensors"))
    json.dump(["good"], open(os.path.join(root, ".active.json"), "w"))
    os.makedirs(os.path.join(root, ".good.abc123.tmp"))
    open(os.path.join(root, ".active.json.xyz.tmp"), "w").write("{")
    return {"truncated", "garbage", "badrank", "strrank", "hugerank", "listjson", "badjson", "noweights", "wrongshape"}


def test_corrupt_adapters_are_skipped_at_startup_and_listed(gpt_worker, byte_tokenizer, tmp_path, serve_app):
    root = str(tmp_path / "adapters")
    bad = corrupt_adapters(gpt_worker, root)
    learn, holder = make_live(gpt_worker, byte_tokenizer, root)
    app = create_app([Worker(0, gpt_worker, byte_tokenizer)], "t", learn=learn, warm_up=False)
    with serve_app(app) as url:  # starting at all is the first check
        listing = httpx.get(url + "/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["good"]
        assert listing["active"] is None  # .active.json held a list: ignored, with a warning
        unusable = {u["name"]: u["error"] for u in listing["unusable"]}
        assert set(unusable) == bad
        assert "rank" in unusable["badrank"] and "rank" in unusable["hugerank"]
        assert "unreadable" in unusable["truncated"] and "unreadable" in unusable["garbage"]
        assert "shape" in unusable["wrongshape"]
        assert ask(url, adapter="good", max_tokens=4).status_code == 200
        assert ask(url, adapter="badrank", max_tokens=4).status_code == 404
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]  # leftovers removed at start


def test_stale_temp_cleanup_restores_an_interrupted_replace(tmp_path, gpt_worker):
    root = str(tmp_path)
    save_test_adapter(gpt_worker, root, "facts")
    os.replace(os.path.join(root, "facts"), os.path.join(root, ".facts.k3j2.old"))  # killed mid-replace
    os.makedirs(os.path.join(root, ".facts.x8y9.tmp"))
    assert remove_stale_temp(root) == [".facts.x8y9.tmp"]
    assert [m["name"] for m in list_adapters(root)] == ["facts"]


def test_delete_waits_for_requests_admitted_with_the_adapter(gpt_worker, byte_tokenizer, tmp_path):
    root = str(tmp_path / "adapters")
    save_test_adapter(gpt_worker, root, "facts")

    async def scenario():
        pool = WorkerPool([Worker(0, gpt_worker, byte_tokenizer)])
        live = LiveLearning(pool, copy.deepcopy(gpt_worker), byte_tokenizer, root)
        live.load_saved()
        pool.start()
        prompt = byte_tokenizer.render_for_completion([{"role": "user", "content": "hi"}])
        gate = threading.Event()
        pool.workers[0].scheduler.call(gate.wait)  # holds the scheduler between two steps: the request can't end
        events = []

        async def request():
            async for event in pool.run(Job(prompt=prompt, max_tokens=4, temperature=0.0, top_k=0,
                                            adapter=live.resolve("facts"))):
                events.append(event)
        req = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        deletion = asyncio.ensure_future(live.delete("facts"))
        await asyncio.sleep(0.1)
        assert not deletion.done()  # waits for the admitted request
        with pytest.raises(KeyError):
            live.resolve("facts")  # new requests: 404
        gate.set()
        await req
        await deletion
        assert events[-1]["type"] == "done", events
        assert "facts" not in live.names() and not os.path.exists(os.path.join(root, "facts"))
        pool.shutdown()
        live.shutdown()

    asyncio.run(scenario())


def test_learn_queue_and_adapter_limits(gpt_worker, byte_tokenizer, tmp_path, serve_app):
    root = str(tmp_path / "adapters")
    save_test_adapter(gpt_worker, root, "one")
    learn, holder = make_live(gpt_worker, byte_tokenizer, root)
    limits = Limits(max_learn_jobs=2, max_adapters=2, job_ttl=60)
    app = create_app([Worker(0, gpt_worker, byte_tokenizer)], "t", learn=learn, limits=limits, warm_up=False)
    body = {"adapter": "two", "facts": [{"question": "q?", "answer": "a"}], "steps": 1}
    with serve_app(app) as url:
        live = holder["live"]
        # two jobs already waiting (the trainer is never started for these records)
        for i in range(2):
            live.jobs[f"fake-{i}"] = LearnJob(id=f"fake-{i}", adapter=f"p{i}", steps=1, examples=1)
        r = httpx.post(url + "/learn", json=body, timeout=30)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "limit is 2" in r.json()["error"]["message"]
        for j in live.jobs.values():
            j.status, j.finished = "done", time.time() - 120  # finished two minutes ago: past job_ttl
        assert httpx.get(url + "/learn/fake-0").status_code == 404  # pruned
        assert live.jobs == {}
        live.jobs["q"] = LearnJob(id="q", adapter="two", steps=1, examples=1)  # "two" on its way: 2 adapters
        with pytest.raises(AdapterLimit, match="at most 2 adapters"):
            live._check_room("three")
        del live.jobs["q"]
        live.max_adapter_bytes = 10
        r = httpx.post(url + "/learn", json=body, timeout=30)
        assert r.status_code == 409 and "bytes" in r.json()["error"]["message"]
    with pytest.raises(JobQueueFull):
        live.max_jobs = 0
        live._check_room("x")


def test_stale_checkpoint_temp_files_are_removed(tmp_path):
    d = str(tmp_path / "d1")
    save_checkpoint(d, 5, {"w": torch.zeros(2)}, None, {"step": 5})
    for leftover in (".model_000010.pt.abc.tmp", ".meta_000010.json.def.tmp", ".optim_000010_rank0.pt.x.tmp"):
        open(os.path.join(d, leftover), "wb").write(b"x" * 100)
    assert remove_stale_checkpoint_temp(d) == sorted([".meta_000010.json.def.tmp", ".model_000010.pt.abc.tmp",
                                                      ".optim_000010_rank0.pt.x.tmp"])
    assert sorted(os.listdir(d)) == ["meta_000005.json", "model_000005.pt"]
    open(os.path.join(d, ".model_000011.pt.q.tmp"), "wb").write(b"x")
    prev = start_fresh(d)  # a new run moves the old one aside, leftovers removed first
    assert sorted(os.listdir(prev)) == ["meta_000005.json", "model_000005.pt"]


# ---------------------------------------------------------------------------------------------
# API keys and exposure

@pytest.fixture(scope="module")
def keyed(byte_tokenizer, serve_app, echo_chat_model):
    app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "nanochat-keyed",
                     api_key="chat-key", admin_key="admin-key", warm_up=False)
    with serve_app(app) as url:
        yield url


def test_api_key_guards_everything_but_health_and_the_page(keyed):
    assert httpx.get(keyed + "/health").status_code == 200
    assert httpx.get(keyed + "/").status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/stats"), ("POST", "/v1/chat/completions"),
                         ("POST", "/chat/completions"), ("GET", "/adapters"), ("GET", "/openapi.json"),
                         ("GET", "/docs")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "chat-key"},
                        {"Authorization": "Basic chat-key"}):
            r = httpx.request(method, keyed + path, headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer" and "API key" in r.json()["error"]["message"]
    assert ask(keyed, "k", key="chat-key", max_tokens=64).status_code == 200
    assert ask(keyed, "k", key="admin-key", max_tokens=64).status_code == 200
    client = openai.OpenAI(base_url=keyed + "/v1", api_key="chat-key", max_retries=0)
    assert client.chat.completions.create(model="x", messages=[{"role": "user", "content": "o"}]).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="nope", max_retries=0).models.list()


def test_admin_key_guards_learning_and_adapter_changes(keyed):
    for method, path in (("POST", "/learn"), ("GET", "/learn/x"), ("POST", "/adapters/a/activate"),
                         ("DELETE", "/adapters/a")):
        assert httpx.request(method, keyed + path, timeout=10).status_code == 401
        r = httpx.request(method, keyed + path, headers={"Authorization": "Bearer chat-key"}, timeout=10)
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
        r = httpx.request(method, keyed + path, headers={"Authorization": "Bearer admin-key"}, timeout=10)
        assert r.status_code in (400, 404), r.text  # past the key check: this server has no live learning


def test_exposure_rules():
    assert "loopback only" in check_exposure("127.0.0.1", None, False)
    assert "loopback only" in check_exposure("::1", None, False)
    assert "loopback only" in check_exposure("localhost", None, False)
    with pytest.raises(ValueError, match="--api-key"):
        check_exposure("0.0.0.0", None, False)
    assert "WARNING" in check_exposure("0.0.0.0", None, True)
    assert "API key required" in check_exposure("0.0.0.0", "k", False)


def test_main_refuses_an_open_public_bind(base_dir, capsys, monkeypatch):
    monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    assert main(["--host", "0.0.0.0", "--port", "9"]) == 1
    err = capsys.readouterr().err
    assert "--api-key" in err and "--insecure" in err


# ---------------------------------------------------------------------------------------------
# slow clients

def test_slow_clients_are_cut_off(byte_tokenizer, echo_chat_model):
    app = create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "slow", warm_up=False)
    with serve_in_thread(app, request_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        for trickle in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # headers never finish
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"):  # body
            s = socket.create_connection((host, int(port)))
            s.sendall(trickle)
            t0 = time.monotonic()
            s.settimeout(0.1)
            closed = False
            while time.monotonic() - t0 < 5:
                try:
                    s.sendall(b"a")  # a byte now and then used to keep the connection alive forever
                    if s.recv(65536) == b"":
                        closed = True
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            s.close()
            assert closed and time.monotonic() - t0 < 3
        assert httpx.get(url + "/health").status_code == 200  # a normal client still gets in


# ---------------------------------------------------------------------------------------------
# the whole API, fuzzed (dev/fuzz_web.py runs the same for longer)

def test_schemathesis_finds_no_server_errors_and_the_document_matches():
    pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install -e '.[dev]')")
    from dev.fuzz_web import main as fuzz
    assert fuzz(["--max-time", "15", "--max-examples", "5"]) == 0
