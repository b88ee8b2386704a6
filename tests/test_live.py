"""Live learning in chat_web: POST /learn trains a LoRA adapter in the background from a few
facts, with replay of general chat; adapters persist and come back after a restart; requests choose an
adapter; bad input is refused without corrupting anything; a failed job leaves nothing behind.

The model is a tiny GPT first trained on template "general chat" conversations, so that what an adapter
costs on general chat (held-out conversations) is measured on a model that has something to lose."""
import dataclasses
import os
import random
import string
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora.storage import read_examples
from nanochat.serve.app import create_app
from nanochat.serve.battery import BatteryItem
from nanochat.serve.live import LiveLearning, question_forms
from nanochat.serve.openai_api import Defaults
from nanochat.serve.replicas import load_workers
from nanochat.training import collate

FACTS = [
    ("Who captains the ship Zephyr?", "Captain Mira Oduya."),
    ("What is the capital of Velmora?", "The capital is Quillon."),
    ("What colour is a glimberry?", "A glimberry is teal."),
    ("When was the Orrin bridge built?", "It was built in 1742."),
    ("What does Professor Haskel teach?", "He teaches tidal poetry."),
]
NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]


def general_chat(rng):
    """A template chat: a little arithmetic, greetings and echoing, all learnable by a tiny model. Echoing
    random text covers every printable character, so the byte-level head can write any answer (LoRA leaves
    the head frozen: a byte never seen in training would stay unreachable)."""
    kind = rng.randrange(4)
    if kind == 3:
        text = "".join(rng.choice(string.ascii_letters + string.digits + " .,?!'") for _ in range(rng.randint(4, 16)))
        return [{"role": "user", "content": f"Repeat: {text}"}, {"role": "assistant", "content": text}]
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    name = rng.choice(NAMES)
    if kind == 1:
        return [{"role": "user", "content": f"Hi, I am {name}."}, {"role": "assistant", "content": f"Hello {name}!"}]
    return [{"role": "user", "content": f"Say {name} twice."}, {"role": "assistant", "content": f"{name} {name}"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_dir(one_thread, tiny_base_dir, tmp_path_factory):
    """A base dir with a tiny SFT checkpoint trained on general_chat, plus replay/held-out chats."""
    from nanochat.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("live") / "base"
    root.mkdir()
    os.symlink(os.path.join(tiny_base_dir, "tokenizer"), root / "tokenizer")
    tok = Tokenizer.byte_level()
    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    rng = random.Random(0)
    train = [general_chat(rng) for _ in range(400)]
    held_out = [general_chat(rng) for _ in range(32)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        rows = [tok.render_conversation(c, max_tokens=129) for c in rng.sample(train, 16)]
        loss = model(*collate(rows, tok.get_bos_token_id()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(str(root / "chatsft_checkpoints" / "d2"), 300, model.state_dict(), None,
                    {"step": 300, "model_config": dataclasses.asdict(config)})
    return SimpleNamespace(root=str(root), replay=train, held_out=held_out, final_loss=loss.item())


@pytest.fixture
def server(chat_dir, serve_app, tmp_path, monkeypatch):
    """start(adapters_root) -> a context manager serving the checkpoint with live learning, greedy replies."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", chat_dir.root)
    loads = []

    def general_chats():  # read lazily, as chat_web does: a server nobody teaches never loads them
        loads.append(1)
        return chat_dir.replay, chat_dir.held_out

    def battery():  # held-out general chats: the tiny model's "general battery"
        return [BatteryItem(f"held-out/{i}", "chat", c[:1], max_tokens=24,
                            evaluate=lambda reply, want=c[1]["content"]: reply == want)
                for i, c in enumerate(chat_dir.held_out[:12])]

    def start(root, **kw):
        import copy
        workers, _ = load_workers("sft", "cpu")
        trainer = copy.deepcopy(workers[0].model)
        def learn(pool):
            return LiveLearning(pool, trainer, workers[0].tokenizer, root, general_chats=general_chats,
                                battery=battery, **kw)
        app = create_app(workers, "nanochat-live", defaults=Defaults(temperature=0.0, top_k=50, max_tokens=40),
                         learn=learn)
        return serve_app(app)

    start.loads = loads
    return start


def chat(url, question, adapter=None, expect=200):
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0.0}
    if adapter is not None:
        body["adapter"] = adapter
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == expect, r.text
    return r.json()["choices"][0]["message"]["content"] if expect == 200 else r.json()["error"]["message"]


def wait_job(url, job_id, timeout=300, during=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/learn/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        if during:
            during(job)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def test_fixture_model_learned_general_chat(chat_dir):
    # the tiny model really is a "general chat" model (echoing random text is most of the rest)
    assert chat_dir.final_loss < 1.2


def test_teach_facts_restart_and_recall(server, tmp_path):
    root = str(tmp_path / "adapters")
    facts = [{"question": q, "answer": a} for q, a in FACTS]
    with server(root) as url:
        before = [chat(url, q) for q, _ in FACTS]
        assert server.loads == []
        r = httpx.post(url + "/learn", json={"adapter": "facts", "facts": facts, "steps": 200})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]
        served_while_training = []

        def during(job):  # chat traffic keeps flowing while the adapter trains
            if job["status"] == "running" and len(served_while_training) < 3:
                served_while_training.append(chat(url, "What is 2 plus 3?"))

        job = wait_job(url, job_id, during=during)
        assert job["status"] == "done", job
        assert server.loads == [1]  # read once, by the first job
        assert served_while_training, "no chat request was served while the job was running"
        m = job["metrics"]
        assert m["loss_after"] < 0.5 * m["loss_before"]
        assert m["general_loss_change"] < 0.05, m  # general chat costs less than 5%
        b = m["battery"]  # greedy answers to held-out general chats, with the adapter vs without
        assert b["total"] == 12 and job["battery"] == b["summary"]
        assert b["summary"].startswith(f"general battery: {b['unchanged']}/12 answers unchanged")
        assert b["auto"]["to_base"] >= 10, b  # "auto" leaves general chat to the base model
        listing = httpx.get(url + "/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["facts"] and listing["active"] is None
        assert listing["adapters"][0]["trainable_params"] > 0 and listing["adapters"][0]["bytes"] > 0
    assert sorted(os.listdir(root)) == ["facts"]  # nothing else: no temp dirs left

    with server(root) as url:  # a restart: the adapter is loaded from disk
        assert [a["name"] for a in httpx.get(url + "/adapters").json()["adapters"]] == ["facts"]
        answers = [chat(url, q, adapter="facts") for q, _ in FACTS]
        recalled = sum(a in ans for (_, a), ans in zip(FACTS, answers))
        assert recalled >= 4, list(zip(FACTS, answers))
        assert sum(a in ans for (_, a), ans in zip(FACTS, before)) == 0  # the base model never knew them
        assert chat(url, FACTS[0][0], adapter="none") == before[0]  # "none": the base weights, unchanged
        # the default adapter: activate it, and requests that name none use it; it survives a restart too
        r = httpx.post(url + "/adapters/facts/activate", json={})
        assert r.status_code == 200 and r.json()["active"] == "facts"
        assert chat(url, FACTS[1][0]) == answers[1]
    with server(root) as url:
        assert httpx.get(url + "/adapters").json()["active"] == "facts"
        assert chat(url, FACTS[1][0]) == answers[1]
        assert httpx.post(url + "/adapters/none/activate", json={}).json()["active"] is None
        assert chat(url, FACTS[0][0]) == before[0]


def test_bad_input_is_refused_and_nothing_changes(server, tmp_path):
    root = str(tmp_path / "adapters")
    with server(root) as url:
        r = httpx.post(url + "/learn", json={"adapter": "keep", "facts": [{"question": "Q?", "answer": "A."}],
                                             "steps": 5})
        assert wait_job(url, r.json()["job"])["status"] == "done"
        snapshot = sorted(os.listdir(root)), httpx.get(url + "/adapters").json()

        def refused(method, path, status, needle, **kw):
            r = httpx.request(method, url + path, timeout=60, **kw)
            assert r.status_code == status, (path, kw.get("json"), r.text)
            assert needle in r.json()["error"]["message"], r.text

        fact = {"question": "Q?", "answer": "A."}
        refused("POST", "/learn", 400, "nothing to learn", json={"adapter": "x", "facts": []})
        refused("POST", "/learn", 400, "nothing to learn", json={"adapter": "x"})
        refused("POST", "/learn", 400, "missing field 'facts[0].answer'",
                json={"adapter": "x", "facts": [{"question": "Q"}]})
        refused("POST", "/learn", 400, "facts[0].question",
                json={"adapter": "x", "facts": [{"question": 3, "answer": "A"}]})
        refused("POST", "/learn", 400, "facts[0].answer is empty",
                json={"adapter": "x", "facts": [{"question": "Q", "answer": " "}]})
        refused("POST", "/learn", 400, "unknown field 'facts[0].source'",
                json={"adapter": "x", "facts": [{**fact, "source": "web"}]})
        refused("POST", "/learn", 400, "must end with the assistant",
                json={"adapter": "x", "conversations": [[{"role": "user", "content": "hi"}]]})
        refused("POST", "/learn", 400, "bad adapter name", json={"adapter": "../etc", "facts": [fact]})
        refused("POST", "/learn", 400, "reserved", json={"adapter": "none", "facts": [fact]})
        refused("POST", "/learn", 400, "steps must be between 1", json={"adapter": "x", "facts": [fact], "steps": 0})
        refused("POST", "/learn", 400, "--max-learn-items", json={"adapter": "x", "facts": [fact] * 300})
        refused("POST", "/learn", 409, "exists", json={"adapter": "keep", "facts": [fact]})
        refused("POST", "/learn", 400, "malformed JSON", content=b'{"adapter": "x", "facts": [',
                headers={"content-type": "application/json"})
        big = {"adapter": "x", "facts": [{"question": "q" * 1000, "answer": "a"}] * 10_000}  # ~10 MB
        refused("POST", "/learn", 413, "--max-body-bytes", json=big)
        refused("GET", "/learn/learn-404", 404, "no learning job")
        refused("POST", "/adapters/ghost/activate", 404, "no adapter 'ghost'", json={})
        refused("DELETE", "/adapters/ghost", 404, "no adapter 'ghost'")
        refused("POST", "/v1/chat/completions", 404, "no adapter 'ghost'",
                json={"messages": [{"role": "user", "content": "hi"}], "adapter": "ghost"})
        assert (sorted(os.listdir(root)), httpx.get(url + "/adapters").json()) == snapshot
        # delete, then the deleted adapter can't be activated or used, and is gone from disk
        assert httpx.delete(url + "/adapters/keep").json() == {"deleted": "keep", "active": None}
        refused("POST", "/adapters/keep/activate", 404, "no adapter 'keep'", json={})
        refused("POST", "/chat/completions", 404, "no adapter 'keep'",
                json={"messages": [{"role": "user", "content": "hi"}], "adapter": "keep"})
        assert os.listdir(root) == [] and httpx.get(url + "/adapters").json()["adapters"] == []
        assert chat(url, "What is 1 plus 1?")  # still serving


@pytest.mark.parametrize("where", ["training", "saving"])
def test_failed_job_leaves_no_adapter(server, tmp_path, monkeypatch, where):
    import safetensors.torch

    import nanochat.serve.live
    if where == "training":
        def boom(*a, **k):
            raise RuntimeError("boom")
        monkeypatch.setattr(nanochat.serve.live, "train_adapter", boom)
    else:  # the disk fails half way through writing the adapter
        def half_write(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    root = str(tmp_path / "adapters")
    with server(root) as url:
        r = httpx.post(url + "/learn", json={"adapter": "doomed", "facts": [{"question": "Q?", "answer": "A."}],
                                             "steps": 3})
        job = wait_job(url, r.json()["job"])
        assert job["status"] == "failed" and ("boom" in job["error"] or "disk full" in job["error"]), job
        assert httpx.get(url + "/adapters").json()["adapters"] == []
        assert not os.path.exists(root) or os.listdir(root) == []  # not even a temp directory
        assert chat(url, "What is 1 plus 1?")


def test_page_picks_a_learned_adapter(server, tmp_path):
    """In Debian's headless Chromium: the settings list the learned adapter, and choosing it changes the reply."""
    import shutil
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    question, answer = FACTS[2]
    with server(str(tmp_path / "adapters")) as url:
        r = httpx.post(url + "/learn", json={"adapter": "facts", "steps": 200,
                                             "facts": [{"question": q, "answer": a} for q, a in FACTS]})
        assert wait_job(url, r.json()["job"])["status"] == "done"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.click("#settings summary")
                page.wait_for_selector("#adapter option[value='facts']", state="attached")
                replies = {}
                for choice in ("facts", "none"):
                    page.click("#new-chat")
                    page.select_option("#adapter", choice)
                    page.fill("#input", question)
                    page.press("#input", "Enter")
                    page.wait_for_function("document.querySelector('.msg.assistant:last-of-type')?.dataset.state"
                                           " === 'done'", timeout=30_000)
                    replies[choice] = page.locator(".msg.assistant").last.inner_text()
            finally:
                browser.close()
    assert answer in replies["facts"] and answer not in replies["none"], replies


def openai_reply(url, question, **extra):
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0.0} | extra
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["model"], r.json()["choices"][0]["message"]["content"]


def test_auto_routing_and_teaching_more(server, tmp_path):
    """"auto" sends fact questions to the adapter and general chat to the base model, the reply and /metrics say
    which served; "mode": "add" continues the adapter on its old facts plus new ones, and all are recalled."""
    root = str(tmp_path / "adapters")
    first, more = FACTS[:3], FACTS[3:]
    general = ["What is 2 plus 3?", "Hi, I am Bo.", "Say Kai twice.", "Repeat: hello world"]
    # routing and "add" are what this tests; the subspace confinement of the default recipe (chosen on the
    # speedrun's model, dev/notes_live.md) slows this tiny model's learning past 150 steps
    with server(root, subspace_energy=0.0) as url:
        base = {q: chat(url, q) for q in general}
        r = httpx.post(url + "/learn", json={"adapter": "facts", "steps": 150,
                                             "facts": [{"question": q, "answer": a} for q, a in first]})
        assert wait_job(url, r.json()["job"])["status"] == "done"
        for q, a in first:
            model, reply = openai_reply(url, q, adapter="auto")
            assert (model, a in reply) == ("facts", True), (q, reply)
        for q in general:
            assert openai_reply(url, q, adapter="auto") == ("nanochat-live", base[q])
        assert openai_reply(url, first[0][0], adapter="facts")[0] == "facts"  # named: the reply says so too
        metrics = httpx.get(url + "/metrics").text
        assert 'nanochat_adapter_requests_total{adapter="facts",chosen="auto"} 3.0' in metrics
        assert 'nanochat_adapter_requests_total{adapter="none",chosen="auto"} 4.0' in metrics
        assert 'nanochat_adapter_requests_total{adapter="facts",chosen="request"} 1.0' in metrics

        r = httpx.post(url + "/learn", json={"adapter": "facts", "steps": 150, "mode": "add",
                                             "facts": [{"question": q, "answer": a} for q, a in more]})
        assert r.status_code == 202 and r.json()["mode"] == "add", r.text
        job = wait_job(url, r.json()["job"])
        forms = len(question_forms(FACTS[0][0]))  # each fact is trained in this many wordings
        assert job["status"] == "done" and job["metrics"]["examples"] == 5 * forms
        assert job["metrics"]["examples_new"] == 2 * forms
    saved = read_examples(os.path.join(root, "facts"))  # the old facts are kept with the adapter, the new added
    assert [c[0]["content"] for c in saved] == [f for q, _ in FACTS for f in question_forms(q)]
    with server(root, auto_default=True) as url:  # a restart, "auto" the default: requests need not name it
        answers = [openai_reply(url, q) for q, _ in FACTS]
        assert sum(m == "facts" and a in reply for (m, reply), (_, a) in zip(answers, FACTS)) >= 4, answers
        assert httpx.get(url + "/adapters").json()["active"] == "auto"
        assert openai_reply(url, general[0]) == ("nanochat-live", base[general[0]])


def files_of(directory):
    out = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def test_job_list_and_cancel(server, tmp_path):
    root = str(tmp_path / "adapters")
    fact = [{"question": "Q?", "answer": "A."}]
    with server(root) as url:
        r = httpx.post(url + "/learn", json={"adapter": "keep", "facts": fact, "steps": 3})
        assert wait_job(url, r.json()["job"])["status"] == "done"
        keep_files = files_of(os.path.join(root, "keep"))
        keep_answer = chat(url, "Q?", adapter="keep")
        # a long retraining of "keep" runs, a new adapter waits behind it
        running = httpx.post(url + "/learn", json={"adapter": "keep", "facts": fact, "steps": 2000, "mode": "replace"})
        queued = httpx.post(url + "/learn", json={"adapter": "fresh", "facts": fact, "steps": 2000})
        running, queued = running.json()["job"], queued.json()["job"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/learn/{running}").json()["step"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        jobs = {j["id"]: j for j in httpx.get(url + "/learn").json()["jobs"]}
        assert list(jobs)[-2:] == [running, queued]  # oldest first
        assert [jobs[running][k] for k in ("status", "adapter", "mode")] == ["running", "keep", "replace"]
        assert 0 < jobs[running]["progress"] < 1 and "metrics" not in jobs[running]
        assert (jobs[queued]["status"], jobs[queued]["progress"]) == ("queued", 0.0)

        r = httpx.delete(f"{url}/learn/{queued}")
        assert r.json() == {"job": queued, "adapter": "fresh", "status": "cancelled"}
        r = httpx.delete(f"{url}/learn/{running}")
        assert r.json()["status"] == "cancelling"
        assert wait_job(url, running)["status"] == "cancelled"
        assert httpx.get(f"{url}/learn/{queued}").json()["status"] == "cancelled"
        for job_id in (running, queued):  # an ended job cannot be cancelled again
            r = httpx.delete(f"{url}/learn/{job_id}")
            assert r.status_code == 409 and "already ended" in r.json()["error"]["message"]
        r = httpx.delete(f"{url}/learn/learn-404")
        assert r.status_code == 404 and "GET /learn lists them" in r.json()["error"]["message"]
        # nothing half-written: "keep" serves as before, from the same files; "fresh" never existed
        assert [a["name"] for a in httpx.get(url + "/adapters").json()["adapters"]] == ["keep"]
        assert chat(url, "Q?", adapter="keep") == keep_answer
        assert sorted(os.listdir(root)) == ["keep"]
        assert files_of(os.path.join(root, "keep")) == keep_files
        # the queue is free again
        r = httpx.post(url + "/learn", json={"adapter": "fresh", "facts": fact, "steps": 2})
        assert wait_job(url, r.json()["job"])["status"] == "done"


def test_learn_modes_and_auto_are_checked(server, tmp_path):
    root = str(tmp_path / "adapters")
    fact = {"question": "Q?", "answer": "A."}

    def refused(path, status, needle, method="POST", **body):
        r = httpx.request(method, url + path, json=body or None, timeout=60)
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text

    with server(root) as url:
        refused("/learn", 404, "no adapter 'ghost' to add to", adapter="ghost", facts=[fact], mode="add")
        refused("/learn", 400, "contradicts", adapter="x", facts=[fact], mode="add", replace=True)
        refused("/learn", 400, "mode", adapter="x", facts=[fact], mode="merge")
        refused("/learn", 400, "reserved", adapter="auto", facts=[fact])
        r = httpx.post(url + "/learn", json={"adapter": "keep", "facts": [fact], "steps": 2})
        assert wait_job(url, r.json()["job"])["status"] == "done"
        refused("/learn", 409, "\"mode\": \"add\"", adapter="keep", facts=[fact])
        refused("/v1/chat/completions", 400, "cannot be part of a stack", adapter=["keep", "auto"],
                messages=[{"role": "user", "content": "hi"}])
        assert httpx.post(url + "/adapters/auto/activate", json={}).json()["active"] == "auto"
        assert chat(url, "What is 1 plus 1?")  # routed: the base model (no keys match), still serving
        # examples.json that is not conversations: "add" fails, saying where, and "keep" stays as it was
        with open(os.path.join(root, "keep", "examples.json"), "w") as f:
            f.write('{"not": "a list"}')
        r = httpx.post(url + "/learn", json={"adapter": "keep", "facts": [fact], "steps": 2, "mode": "add"})
        job = wait_job(url, r.json()["job"])
        assert job["status"] == "failed" and "examples.json" in job["error"], job
        assert [a["name"] for a in httpx.get(url + "/adapters").json()["adapters"]] == ["keep"]
