"""Continual learning: metrics, rehearsal buffer, sequences, the five strategies end to end on a tiny
model, live adapter training, and the train/eval scripts writing the report section."""
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.continual.adapter_train import train_adapter
from nanochat.continual.loop import ContinualConfig, continual_metrics, evaluate_tasks, run_strategy, train_loop
from nanochat.continual.strategies import ReservoirBuffer, Strategy, sample_continuations
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat.training import collate
from tasks.continual import build_sequence, chunk_docs, load_sequence_spec

SEQ_LEN = 48


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# tiny data: three very different text domains, told apart by the shards' `source` column

def letters_doc(rng):
    words = "cat dog sun moon tree bird fish red green blue runs sees eats big small".split()
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) + "." for _ in range(30))


def digits_doc(rng):
    lines = []
    for _ in range(40):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b};")
    return " ".join(lines)


def code_doc(rng):
    names = "foo bar baz qux spam eggs load save".split()
    return "\n".join(f"def {rng.choice(names)}{rng.randint(0, 99)}(x):\n"
                     f"    return x*{rng.randint(0, 99)}+{rng.randint(0, 99)}"
                     for _ in range(rng.randint(8, 14)))


DOMAINS = {"letters": letters_doc, "digits": digits_doc, "code": code_doc}


@pytest.fixture(scope="session")
def cl_dir(tmp_path_factory):
    """A base dir: 3 shards (the last is validation) of the three domains + a byte-level tokenizer."""
    root = tmp_path_factory.mktemp("cl_base")
    data = root / "base_data"
    data.mkdir()
    rng = random.Random(0)
    schema = pa.schema([("text", pa.string()), ("source", pa.string())])
    for s in range(3):
        texts, sources = [], []
        for _ in range(6):
            for name, fn in DOMAINS.items():
                texts.append(fn(rng))
                sources.append(name)
        pq.write_table(pa.table({"text": texts, "source": sources}, schema=schema), data / f"shard_{s:05d}.parquet")
    Tokenizer.byte_level().save(str(root / "tokenizer"))
    seq = {"name": "tiny-lm", "description": "three byte-level domains",
           "tasks": [{"name": n, "type": "lm", "sources": [n]} for n in DOMAINS]}
    (root / "tiny-lm.json").write_text(json.dumps(seq))
    return str(root)


@pytest.fixture
def tok():
    return Tokenizer.byte_level()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(sequence_len=64, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))


@pytest.fixture(scope="session")
def pretrained(cl_dir):
    """A tiny model briefly trained on all three domains: continual learning starts from a model that
    knows a little of everything (LoRA cannot move a random model's near-zero lm_head)."""
    tok = Tokenizer.byte_level()
    model = tiny_model()
    rows = [r for t in lm_tasks(cl_dir, tok) for r in t.train_rows]
    train_loop(model, rows, Strategy(model, tok, ContinualConfig(steps=40, batch_size=8, lr=3e-3, log_every=1000), []))
    return {k: v.clone() for k, v in model.state_dict().items()}


def pretrained_model(state):
    model = tiny_model()
    model.load_state_dict(state)
    return model


def lm_tasks(cl_dir, tok, n_train=48, n_eval=12, names=None):
    spec = load_sequence_spec(os.path.join(cl_dir, "tiny-lm.json"))
    if names:
        spec["tasks"] = [t for t in spec["tasks"] if t["name"] in names]
    return build_sequence(spec, tok, SEQ_LEN, n_train, n_eval_rows=n_eval, batch_size=8,
                          data_dir=os.path.join(cl_dir, "base_data"), route_prefix=16)


def fast_cfg(**kw):
    cfg = dict(steps=30, batch_size=8, lr=3e-3, lora_lr=3e-2, lora_rank=4, lora_alpha=8, warmup_steps=2,
               replay_size=32, replay_ratio=0.5, ewc_lambda=100.0, ewc_samples=8, ssr_samples=16, ssr_prompts=2,
               ssr_prompt_tokens=4, ssr_len=SEQ_LEN + 1, router_rows=16, log_every=1000)
    cfg.update(kw)
    return ContinualConfig(**cfg)


# ---------------------------------------------------------------------------------------------
# metrics and buffer

def test_metrics_accuracy_and_bpb_signs():
    base = [0.25, 0.25, 0.25]
    R = [[0.8, 0.3, 0.25],
         [0.6, 0.9, 0.35],
         [0.5, 0.7, 0.9]]
    m = continual_metrics(R, base, higher_is_better=True)
    assert m["ACC"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["LA"] == pytest.approx((0.8 + 0.9 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # < 0: forgetting
    assert m["FWT"] == pytest.approx(((0.3 - 0.25) + (0.35 - 0.25)) / 2)
    assert m["forgetting_per_task"] == pytest.approx([0.8 - 0.5, 0.9 - 0.7])
    assert m["forgetting"] == pytest.approx(0.25)
    # the same story in bits per byte (lower is better): forgetting is the increase in bpb, still > 0
    base = [3.0, 3.0, 3.0]
    R = [[2.0, 2.9, 3.0],
         [2.4, 1.5, 2.8],
         [2.2, 1.9, 1.0]]
    m = continual_metrics(R, base, higher_is_better=False)
    assert m["forgetting_per_task"] == pytest.approx([2.2 - 2.0, 1.9 - 1.5])
    assert m["BWT"] == pytest.approx(-((2.2 - 2.0) + (1.9 - 1.5)) / 2)
    assert m["FWT"] == pytest.approx(((3.0 - 2.9) + (3.0 - 2.8)) / 2)  # > 0: earlier tasks helped
    assert m["ACC"] == pytest.approx((2.2 + 1.9 + 1.0) / 3)


def test_reservoir_is_bounded_and_uniform():
    buf = ReservoirBuffer(10, seed=0)
    for i in range(5):
        buf.add(([i], [1]))
    assert len(buf) == 5  # fills up first
    hits_early = hits_late = 0
    for trial in range(300):
        buf = ReservoirBuffer(20, seed=trial)
        for i in range(400):
            buf.add(([i], [1]))
        assert len(buf) == 20 and buf.seen == 400
        ids = [it[0][0] for it in buf.items]
        hits_early += sum(i < 200 for i in ids)
        hits_late += sum(i >= 200 for i in ids)
    # every item is kept with probability 20/400, early or late
    assert abs(hits_early - hits_late) / (hits_early + hits_late) < 0.06
    assert len(buf.sample(7, random.Random(0))) == 7


# ---------------------------------------------------------------------------------------------
# sequences

def test_shipped_sequences_parse():
    lm = load_sequence_spec("lm-domains")
    assert [t["name"] for t in lm["tasks"]] == ["literature", "python-docs", "speeches", "linux-docs"]
    chat = load_sequence_spec("chat-tasks")
    assert all(t["type"] == "chat" for t in chat["tasks"])


def test_bad_sequences_are_refused(tmp_path):
    bad = {"tasks": [{"name": "a", "type": "lm", "sources": ["x"]}, {"name": "b", "type": "chat", "task": "gsm8k"}]}
    (tmp_path / "mixed.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="one metric"):
        load_sequence_spec(str(tmp_path / "mixed.json"))
    (tmp_path / "one.json").write_text(json.dumps({"tasks": [bad["tasks"][0]]}))
    with pytest.raises(ValueError, match="at least 2"):
        load_sequence_spec(str(tmp_path / "one.json"))
    with pytest.raises(FileNotFoundError, match="lm-domains"):
        load_sequence_spec("no-such-sequence")


def test_lm_domains_come_from_their_source_and_hold_out_validation(cl_dir, tok):
    tasks = lm_tasks(cl_dir, tok)
    assert [t.name for t in tasks] == ["letters", "digits", "code"]
    for t in tasks:
        assert len(t.train_rows) == 48 and len(t.eval_items) == 12
        assert all(len(ids) <= SEQ_LEN + 1 and ids[0] == tok.get_bos_token_id() for ids, _ in t.train_rows)
        train_text = {tok.decode(ids[1:]) for ids, _ in t.train_rows}
        assert not train_text & {tok.decode(ids[1:]) for ids, _ in t.eval_items}
    assert all("=" in tok.decode(ids[1:]) for ids, _ in tasks[1].train_rows[:10])
    assert all("=" not in tok.decode(ids[1:]) for ids, _ in tasks[0].train_rows)
    # rows are taken round-robin over documents: the first rows come from different documents
    docs = ["a" * 200, "b" * 200]
    rows = chunk_docs(tok, docs, 50, limit=3)
    assert [chr(r[0][1]) for r in rows] == ["a", "b", "a"]


def test_collate_masks_targets():
    x, y = collate([([9, 1, 2, 3], [0, 0, 1, 1]), ([9, 4], [0, 1])], pad_id=9)
    assert x.tolist() == [[9, 1, 2], [9, 9, 9]]
    assert y.tolist() == [[-1, 2, 3], [4, -1, -1]]


# ---------------------------------------------------------------------------------------------
# strategies

def test_naive_forgets_lora_does_not_and_replay_helps(cl_dir, tok, pretrained):
    tasks = lm_tasks(cl_dir, tok, names=["letters", "digits"])
    model = pretrained_model(pretrained)
    initial = pretrained
    base = evaluate_tasks(model, tasks)
    cfg = fast_cfg()
    res = {}
    for s in ("naive", "replay", "lora"):
        model.load_state_dict(initial)
        res[s] = run_strategy(model, tok, tasks, s, cfg, base=base)
    naive = res["naive"]["matrices"]["naive"]
    assert naive["R"][0][0] < base[0] - 0.5  # it learned task 0 ...
    assert naive["forgetting"] > 0.5  # ... and lost much of it learning task 1
    lora = res["lora"]["matrices"]["lora"]
    assert lora["R"][1][0] == lora["R"][0][0]  # by construction: adapter 0 and the base never change
    assert lora["forgetting"] == 0.0 and lora["BWT"] == 0.0
    assert lora["R"][0][1] == base[1]  # task 1 before its adapter exists = the base model
    assert lora["R"][0][0] < base[0] - 0.05 and lora["R"][1][1] < base[1] - 0.03  # each adapter learned its task
    # fp32 adapters plus one router centroid (n_embd floats) per task
    assert res["lora"]["added_params"] > 0
    assert res["lora"]["added_bytes"] == 4 * res["lora"]["added_params"] + 2 * 64 * 4
    router = res["lora"]["matrices"]["lora-router"]
    assert router["R"][1] == pytest.approx(lora["R"][1])  # distinct domains: the router finds the right adapter
    assert res["lora"]["router_accuracy"] == [[1.0, None], [1.0, 1.0]]
    assert all(p.requires_grad for p in model.parameters())  # the LoRA was closed: nothing stays frozen
    replay = res["replay"]["matrices"]["replay"]
    assert replay["forgetting"] < 0.5 * naive["forgetting"]
    assert res["replay"]["added_bytes"] > 0 and res["naive"]["added_bytes"] == 0


def test_ewc_and_ssr_run_and_record_everything(cl_dir, tok, pretrained):
    tasks = lm_tasks(cl_dir, tok, n_train=24, n_eval=6)
    model = pretrained_model(pretrained)
    initial = pretrained
    base = evaluate_tasks(model, tasks)
    cfg = fast_cfg(steps=10)
    for s in ("ewc", "ssr"):
        model.load_state_dict(initial)
        r = run_strategy(model, tok, tasks, s, cfg, base=base)
        m = r["matrices"][s]
        assert len(m["R"]) == 3 and all(len(row) == 3 for row in m["R"])
        assert all(v == v and v > 0 for row in m["R"] for v in row)
        assert len(m["forgetting_per_task"]) == 2
        assert r["added_bytes"] > 0 and r["wall_seconds"] > 0 and len(r["train_log"]) == 3
        assert json.loads(json.dumps(r)) == r  # JSON-able as is


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away(cl_dir, tok):
    from nanochat.continual.strategies import EWC
    tasks = lm_tasks(cl_dir, tok, n_train=16, n_eval=4, names=["letters", "digits"])
    model = tiny_model()
    ewc = EWC(model, tok, fast_cfg(), tasks)
    assert ewc.penalty() is None
    ewc.after_task(0, tasks[0])
    assert all((f >= 0).all() for f in ewc.fisher) and sum(f.sum() for f in ewc.fisher) > 0
    pen = ewc.penalty()
    assert pen().item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert pen().item() > 0


def test_ssr_pseudo_samples_continue_prompts(tok):
    model = tiny_model()
    bos = tok.get_bos_token_id()
    prompts = [[bos, 97, 98], [bos, 99, 100], [bos, 101]]
    out = sample_continuations(model, prompts, row_len=20, temperature=1.0, seed=0, stop_ids={bos})
    again = sample_continuations(model, prompts, row_len=20, temperature=1.0, seed=0, stop_ids={bos})
    assert out == again  # seeded
    for p, g in zip(prompts, out):
        assert len(p) + len(g) <= 20 and bos not in g
    greedy = sample_continuations(model, prompts[:1], row_len=12, temperature=0.0)
    expected = list(model.generate(prompts[0], 9, temperature=0))
    assert greedy[0] == expected  # the batched KV-cache sampler agrees with the model's own sampler


# ---------------------------------------------------------------------------------------------
# chat tasks

def write_jsonl(path, convs):
    path.write_text("\n".join(json.dumps(c) for c in convs) + "\n")


def chat_sequence(tmp_path):
    colors = [{"messages": [{"role": "user", "content": f"Which is a color? A. {c} B. {a}"},
                            {"role": "assistant", "content": "A"}], "letters": ["A", "B"]}
              for c, a in [("red", "dog"), ("blue", "cat"), ("green", "cow"), ("pink", "owl"), ("gray", "ant")] * 2]
    echo = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["one", "two", "three", "four", "five"] * 2]
    write_jsonl(tmp_path / "colors.jsonl", colors)
    write_jsonl(tmp_path / "echo.jsonl", echo)
    spec = {"name": "tiny-chat", "tasks": [{"name": "colors", "type": "chat", "jsonl": "colors.jsonl"},
                                           {"name": "echo", "type": "chat", "jsonl": "echo.jsonl",
                                            "max_new_tokens": 8}]}
    (tmp_path / "tiny-chat.json").write_text(json.dumps(spec))
    return str(tmp_path / "tiny-chat.json")


def test_chat_sequence_accuracy_pseudo_rows_and_lora_router(tmp_path, tok):
    tasks = build_sequence(chat_sequence(tmp_path), tok, SEQ_LEN, 8, n_eval_examples=10)
    colors, echo = tasks
    assert colors.metric == "accuracy" and colors.higher_is_better
    assert len(colors.train_rows) == 8 and len(colors.eval_items) == 2  # every 5th item is held out
    model = tiny_model()
    acc = colors.evaluate(model)
    assert acc in (0.0, 0.5, 1.0)
    assert colors.score(model, [0])[1] == 1
    assert echo.max_new_tokens == 8
    # a generated conversation becomes a row with loss only on the assistant's reply
    S = tok.encode_special
    prompt = echo.prompts(1, 3)[0]
    assert prompt[:2] == [tok.get_bos_token_id(), S("<|user_start|>")] and len(prompt) == 5
    gen = tok.encode("ne") + [S("<|user_end|>"), S("<|assistant_start|>")] + tok.encode("hi")
    ids, mask = echo.pseudo_row(prompt, gen)
    assert ids[-1] == S("<|assistant_end|>")
    assert [t for t, m in zip(ids, mask) if m] == tok.encode("hi") + [S("<|assistant_end|>")]
    assert echo.pseudo_row(prompt, tok.encode("no answer")) is None
    # lora with the router over chat tasks: the router sees prompts only
    r = run_strategy(model, tok, tasks, "lora", fast_cfg(steps=5, batch_size=4))
    assert set(r["matrices"]) == {"lora", "lora-router"}
    assert all(0.0 <= v <= 1.0 for row in r["matrices"]["lora-router"]["R"] for v in row)


# ---------------------------------------------------------------------------------------------
# live learning

def test_train_adapter_learns_conversations_and_persists(base_dir, tok, pretrained):
    from nanochat.lora.adapter import LoRA
    from nanochat.lora.storage import adapter_path, list_adapters, load_adapter, save_adapter
    model = pretrained_model(pretrained)
    lora = LoRA(model)
    lora.add("other", rank=2, alpha=2)
    lora.activate("other")
    facts = [{"messages": [{"role": "user", "content": "What is the secret word?"},
                           {"role": "assistant", "content": "The secret word is zebra."}]}]
    replay = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    seen = []
    ad = train_adapter(model, tok, facts, replay, steps=60, name="secret", rank=8, alpha=16, lr=3e-2,
                       progress=seen.append)
    assert ad is lora.adapters["secret"] and lora.active == "other"  # the previous adapter is back
    assert ad.info["metrics"]["loss_after"] < 0.85 * ad.info["metrics"]["loss_before"]
    assert seen and seen[-1]["step"] == 60 and {"loss", "tok_per_sec", "eta_s"} <= set(seen[-1])
    assert ad.centroid is not None
    path = adapter_path("secret")
    assert path == os.path.join(base_dir, "adapters", "secret")
    save_adapter(lora, "secret", path)
    assert [m["name"] for m in list_adapters()] == ["secret"]
    fresh = pretrained_model(pretrained)
    lora2 = LoRA(fresh)
    load_adapter(lora2, path, activate=True)
    x, y = collate([tok.render_conversation(facts[0])], tok.get_bos_token_id())
    lora.activate("secret")
    assert torch.equal(fresh(x, y), model(x, y))
    # cancelling removes the half-trained adapter
    assert train_adapter(model, tok, facts, steps=5, name="cancelled", should_stop=lambda: True) is None
    assert "cancelled" not in lora.adapters


# ---------------------------------------------------------------------------------------------
# the scripts

def test_train_and_eval_scripts_write_the_report_section(cl_dir, tmp_path, monkeypatch, pretrained):
    from nanochat.checkpoint_manager import save_checkpoint
    root = tmp_path / "base"
    root.mkdir()
    for name in ("base_data", "tokenizer"):
        os.symlink(os.path.join(cl_dir, name), root / name)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    model = pretrained_model(pretrained)
    cfg = {"sequence_len": 64, "vocab_size": 265, "n_layer": 1, "n_head": 1, "n_kv_head": 1, "n_embd": 64,
           "softcap": 15.0}
    save_checkpoint(str(root / "base_checkpoints" / "d1"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": cfg})
    from scripts import continual_eval, continual_train
    seq = os.path.join(cl_dir, "tiny-lm.json")
    args = ["-i", "base", "--sequence", seq, "--steps", "4", "--batch-size", "4", "--seq-len", "32",
            "--eval-rows", "4", "--ssr-samples", "4", "--ewc-samples", "2", "--router-rows", "4", "--lr", "3e-3",
            "--save-adapters", "--device-type", "cpu"]
    continual_train.main(args)
    out = root / "continual" / "tiny-lm"
    assert sorted(os.listdir(out)) == ["adapters", "base.json", "ewc.json", "lora.json", "merge.json", "naive.json",
                                       "olora.json", "replay.json", "ssr.json"]
    assert len(os.listdir(out / "adapters")) == 3 * 3  # lora, merge and olora: one adapter per task each
    mtime = os.path.getmtime(out / "naive.json")
    continual_train.main(args + ["--resume", "--strategies", "naive"])  # same settings: nothing to redo
    assert os.path.getmtime(out / "naive.json") == mtime
    continual_eval.main([])
    section = (root / "report" / "continual-learning.md").read_text()
    for name in ("naive", "replay", "ewc", "lora", "lora-router", "ssr", "merge", "olora"):
        assert f"R matrix, {name}:" in section
    assert "| after \\ on | letters | digits | code |" in section
    assert "cut vs naive %" in section and "cuts naive's forgetting" in section
    assert (root / "report" / "continual_tiny-lm.png").stat().st_size > 1000
    meta = json.loads((root / "report" / "continual-learning.json").read_text())
    assert meta["stage"] == "CL" and "naive forgetting (bpb)" in meta["summary"]
