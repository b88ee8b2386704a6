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
import safetensors.torch
import torch

from nanochat.checkpoint_manager import remove_stale_temp as remove_stale_checkpoint_temp, save_checkpoint, start_fresh
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora.adapter import LoRA
from nanochat.lora.storage import list_adapters, remove_stale_temp, save_adapter
from nanochat.serve.app import create_app, serve_in_thread
from nanochat.serve.live import AdapterLimit, JobQueueFull, LearnJob, LiveLearning
from nanochat.serve.openai_api import Limits
from nanochat.serve.replicas import Job, Worker, WorkerPool
from nanochat.serve.security import check_exposure
from scripts.chat_web import main
from tests.conftest import unjam_fifos

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
    assert fuzz(["--max-time", "10", "--max-examples", "5"]) == 0  # two runs: the whole API, then the floats


# ---------------------------------------------------------------------------------------------
# hostile adapters: broken values, files that are not files, a job that diverges

def hostile_adapters(model, root):
    """A good adapter beside everything that used to hang, crash or poison the server. -> {name: reason}."""
    save_test_adapter(model, root, "good")
    d = lambda *p: os.path.join(root, *p)
    for name in ("nanweights", "hugeweights", "fifoweights", "linkweights"):
        save_test_adapter(model, root, name)
    for name, value in (("nanweights", float("nan")), ("hugeweights", 1e38)):  # well-formed safetensors
        t = safetensors.torch.load_file(d(name, "adapter.safetensors"))
        next(iter(t.values())).fill_(value)
        safetensors.torch.save_file(t, d(name, "adapter.safetensors"))
    os.remove(d("fifoweights", "adapter.safetensors"))
    os.mkfifo(d("fifoweights", "adapter.safetensors"))
    os.remove(d("linkweights", "adapter.safetensors"))
    os.symlink("/dev/zero", d("linkweights", "adapter.safetensors"))
    os.makedirs(d("fifojson"))
    os.mkfifo(d("fifojson", "adapter.json"))
    os.makedirs(d("deepjson"))
    with open(d("deepjson", "adapter.json"), "w") as f:
        f.write("[" * 200_000 + "]" * 200_000)
    os.mkfifo(d(".active.json"))
    return {"nanweights": "NaN", "hugeweights": "far below", "fifoweights": "FIFO", "linkweights": "symbolic link",
            "fifojson": "FIFO", "deepjson": "nests deeper"}


def test_hostile_adapter_files_neither_block_nor_crash_startup(gpt_worker, byte_tokenizer, tmp_path):
    root = str(tmp_path / "adapters")
    bad = hostile_adapters(gpt_worker, root)
    learn, holder = make_live(gpt_worker, byte_tokenizer, root)
    app = create_app([Worker(0, gpt_worker, byte_tokenizer)], "t", learn=learn, warm_up=False)
    fifos = [os.path.join(root, *p) for p in (("fifoweights", "adapter.safetensors"), ("fifojson", "adapter.json"),
                                               (".active.json",))]
    with unjam_fifos(fifos, after=30), serve_in_thread(app, startup_timeout=60) as url:  # FIFOs blocked startup
        listing = httpx.get(url + "/adapters", timeout=10).json()
        assert [a["name"] for a in listing["adapters"]] == ["good"] and listing["active"] is None
        unusable = {u["name"]: u["error"] for u in listing["unusable"]}
        assert set(unusable) == set(bad)
        for name, why in bad.items():
            assert why in unusable[name], (name, unusable[name])
        assert ask(url, adapter="good", max_tokens=4).status_code == 200
        assert ask(url, adapter="nanweights", max_tokens=4).status_code == 404
        r = httpx.post(url + "/adapters/good/activate", json={}, timeout=10)  # .active.json (a FIFO) is replaced
        assert r.status_code == 200 and os.path.isfile(os.path.join(root, ".active.json"))


def wait_for_job(url, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/learn/{job_id}", timeout=10).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_a_job_that_diverges_fails_and_its_adapter_never_serves(gpt_worker, byte_tokenizer, tmp_path, monkeypatch):
    import nanochat.serve.live
    real = nanochat.serve.live.train_adapter

    def diverging(*a, **k):  # trains for real, then its weights blow up as a run with too high a lr would
        ad = real(*a, **k)
        with torch.no_grad():
            ad.B[0].fill_(float("nan"))
        return ad

    monkeypatch.setattr(nanochat.serve.live, "train_adapter", diverging)
    root = str(tmp_path / "adapters")
    save_test_adapter(gpt_worker, root, "facts")
    learn, holder = make_live(gpt_worker, byte_tokenizer, root)
    app = create_app([Worker(0, gpt_worker, byte_tokenizer)], "t", learn=learn, warm_up=False)
    with serve_in_thread(app, startup_timeout=30) as url:
        before = ask(url, "q", adapter="facts", max_tokens=8, temperature=0.0).json()["choices"][0]["message"]
        fact = {"question": "Q?", "answer": "A."}
        for name, replace in (("fresh", False), ("facts", True)):  # a new adapter, and retraining one that serves
            r = httpx.post(url + "/learn", json={"adapter": name, "facts": [fact], "steps": 1, "replace": replace})
            job = wait_for_job(url, r.json()["job"])
            assert job["status"] == "failed" and "NaN" in job["error"] and "neither saved nor loaded" in job["error"]
        assert [a["name"] for a in httpx.get(url + "/adapters").json()["adapters"]] == ["facts"]
        assert sorted(os.listdir(root)) == ["facts"]
        ask_text = ask(url, "q", adapter="facts", max_tokens=8, temperature=0.0).json()["choices"][0]["message"]
    assert ask_text == before  # the old version still serves


# ---------------------------------------------------------------------------------------------
# float parameters at the edges of what float32 can hold

EXTREMES = [5e-324, 1e-46, 7e-46, 1.4e-45, 1e-40, 1.1754943508222875e-38, 1e-300, -0.0, 0.0, 1.0, 2.0, 1e38, 3.5e38,
            1.7976931348623157e308, -5e-324, -1.7976931348623157e308]


@pytest.fixture(scope="module")
def adapted(byte_tokenizer, tmp_path_factory):
    """A keyless server with live learning and one adapter ("good"), for parameters that reach the adapters."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=byte_tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                          n_kv_head=1, n_embd=64))
    model.init_weights()
    root = str(tmp_path_factory.mktemp("adapted") / "adapters")
    save_test_adapter(model, root, "good")
    learn, _ = make_live(model, byte_tokenizer, root)
    app = create_app([Worker(0, model, byte_tokenizer)], "t", learn=learn, warm_up=False)
    with serve_in_thread(app) as url:
        yield url


def test_no_float_parameter_value_answers_500(adapted):
    """Every float field at every extreme (subnormals, float32's edges, -0.0, float64's max) on every generating
    route: a reply or a 400 for that field, never a 500. top_p below ~7e-46 used to round to 0 in float32."""
    messages = [{"role": "user", "content": "hi"}]
    fields = {"temperature": {}, "top_p": {"temperature": 1.0}, "presence_penalty": {"temperature": 1.0},
              "frequency_penalty": {"temperature": 0.0}, "adapter_weights": {"adapter": ["good"], "temperature": 1.0}}
    routes = {"/v1/chat/completions": {"messages": messages}, "/v1/completions": {"prompt": "hi"},
              "/chat/completions": {"messages": messages}}
    statuses = {}
    with httpx.Client(timeout=30) as http:
        for route, base in routes.items():
            for name, extra in fields.items():
                if route == "/chat/completions" and name not in ("temperature", "adapter_weights"):
                    continue  # the page's body has no top_p or penalties
                for v in EXTREMES:
                    body = {**base, **extra, name: [v] if name == "adapter_weights" else v, "max_tokens": 3}
                    r = http.post(adapted + route, json=body)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code in (200, 400), (route, name, v, r.text)
                    if r.status_code == 400:
                        assert r.json()["error"]["param"] == name, (route, name, v, r.text)
                    elif route == "/chat/completions":
                        assert '"type": "done"' in r.text and '"type": "error"' not in r.text, (name, v, r.text)
    assert statuses[200] > 50 and statuses[400] > 20  # both kinds were really exercised


# ---------------------------------------------------------------------------------------------
# without a key: what a web page in the user's browser can send

def test_keyless_server_refuses_cross_site_posts(adapted):
    """A page can send another site a form, text/plain or a body without a type without the browser asking that
    site first: none of them may change anything (an adapter switched, a job planted, compute spent)."""
    url = adapted
    for headers, body in (({"Content-Type": "text/plain"}, "{}"), ({"Content-Type": "application/x-www-form-urlencoded"},
                          "a=1"), ({"Content-Type": "multipart/form-data; boundary=x"}, "--x--"), ({}, None)):
        r = httpx.post(url + "/adapters/good/activate", headers=headers, content=body, timeout=10)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    learn = json.dumps({"adapter": "planted", "facts": [{"question": "q?", "answer": "a"}], "steps": 1})
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    for path, body in (("/learn", learn), ("/v1/chat/completions", chat), ("/chat/completions", chat)):
        for kind in ("text/plain", None):  # a fetch() with a Blob body sends no type, and FastAPI parsed it as JSON
            r = httpx.post(url + path, content=body, headers={"Content-Type": kind} if kind else {}, timeout=10)
            assert r.status_code == 415, (path, kind, r.text)
    listing = httpx.get(url + "/adapters", timeout=10).json()
    assert listing["active"] is None and "planted" not in str(listing)
    # what the page, curl -H and the OpenAI client send still works
    assert httpx.post(url + "/adapters/good/activate", json={}, timeout=10).json()["active"] == "good"
    r = httpx.post(url + "/adapters/none/activate", headers={"X-Requested-With": "curl"}, timeout=10)
    assert r.json()["active"] is None
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(model="t", messages=[{"role": "user", "content": "o"}], max_tokens=2).choices


def test_keyless_server_refuses_rebound_host_names(adapted):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 is same-origin with the server
    as far as the browser knows, and sends its own name as Host."""
    url = adapted
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
        for method, path in (("GET", "/health"), ("GET", "/adapters"), ("POST", "/adapters/good/activate")):
            r = httpx.request(method, url + path, headers={"Host": host}, json={}, timeout=10)
            assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]["message"], (host, path, r.text)
    assert httpx.get(url + "/adapters", timeout=10).json()["active"] is None
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST.", "127.0.0.2"):
        assert httpx.get(url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host


def test_no_redirect_is_built_from_the_host_header(keyed, adapted):
    """A path that differs from a route by a trailing slash used to answer 307 with a Location made of the
    client's Host header. With a key the Host is not checked (a page cannot send the key), so try it there."""
    for url, headers in ((keyed, {"Host": "evil.example", "Authorization": "Bearer admin-key"}), (adapted, {})):
        for method, path in (("DELETE", "/adapters/x%2F"), ("GET", "/health/"), ("POST", "/adapters/x/activate/")):
            r = httpx.request(method, url + path, headers=headers, json={}, timeout=10)
            assert r.status_code == 404 and "location" not in r.headers, (url, path, r.status_code, r.headers)


def test_allowed_hosts_extend_the_names_a_keyless_server_answers_to(byte_tokenizer, echo_chat_model, keyed):
    def app(**kw):
        return create_app([Worker(0, echo_chat_model(byte_tokenizer), byte_tokenizer)], "h", warm_up=False, **kw)

    with serve_in_thread(app(allowed_hosts=["chat.lan"])) as url:
        assert httpx.get(url + "/health", headers={"Host": "chat.lan:8000"}, timeout=10).status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}, timeout=10).status_code == 400
    with serve_in_thread(app(allowed_hosts=["*"])) as url:
        assert httpx.get(url + "/health", headers={"Host": "anything.example"}, timeout=10).status_code == 200
    # with a key neither check applies (the key keeps pages out): past the guard, this server has no live learning
    assert httpx.post(keyed + "/adapters/x/activate", headers={"Authorization": "Bearer admin-key"},
                      timeout=10).status_code == 404
    with pytest.raises(ValueError, match="--allowed-hosts is for servers without --api-key"):
        check_exposure("127.0.0.1", "k", False, ["chat.lan"])
