"""Tools: call parsing, the python REPL (state, limits, readable errors), the BM25 index and build_index,
the tool-use tasks, and every tool end to end through the Engine (forced output in the KV cache)."""
import json
import os

import pytest
import torch
import torch.nn as nn

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat.tools.registry import (
    CALCULATOR_REFUSED,
    UNAVAILABLE,
    PythonLimits,
    PythonREPL,
    ToolRegistry,
    parse_call,
)
from nanochat.tools.search import Searcher, build_index, match_expression, split_passages
from tests.conftest import at_positions

TOK = Tokenizer.byte_level()
V = TOK.get_vocab_size()
S = TOK.encode_special
NO_TOOLS = ToolRegistry(calculator=False, python=False)
BOS, A_START, A_END = TOK.get_bos_token_id(), S("<|assistant_start|>"), S("<|assistant_end|>")
PY_START, PY_END = S("<|python_start|>"), S("<|python_end|>")
OUT_START, OUT_END = S("<|output_start|>"), S("<|output_end|>")


# --- parsing and the REPL ------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2+3", ("calculator", "2+3")),
    ("python:\nx = 1\nx", ("python", "x = 1\nx")),
    ("  python: print(1)", ("python", "print(1)")),
    ("python:\n  if 1:\n    pass", ("python", "  if 1:\n    pass")),
    ("search:  capital of France ", ("search", "capital of France")),
    ("'python:'.count('p')", ("calculator", "'python:'.count('p')")),
])
def test_parse_call(text, expected):
    assert parse_call(text) == expected


def test_repl_keeps_state_and_reports_readable_errors():
    repl = PythonREPL(PythonLimits(timeout=10))
    assert repl("x = 20\ndef f(y):\n    return y + 1") == ""
    assert repl("print('hi')\nf(x) * 2") == "hi\n42"
    assert (repl("import datetime\ndatetime.date(2024, 3, 1) - datetime.date(2024, 2, 1)")
            == "datetime.timedelta(days=29)")
    assert repl("y") == "NameError: name 'y' is not defined"
    assert repl("print('before')\n1/0") == "before\nZeroDivisionError: division by zero"
    assert repl("def g(:") == "SyntaxError: invalid syntax (line 1)"
    assert repl("x = x + 1") == ""  # the failed cells replay quietly
    assert repl("x, f(1)") == "(21, 2)"
    assert repl("a = 5\n1/0") == "ZeroDivisionError: division by zero"
    assert repl("a") == "5"  # what a failed cell did before its error stays, as in a REPL
    assert len(repl.cells) == 9  # all but the one that did not compile
    # a second conversation starts empty
    assert PythonREPL()("x") == "NameError: name 'x' is not defined"


def test_repl_limits():
    repl = PythonREPL(PythonLimits(timeout=1.0, max_output_chars=50, max_code_chars=200, max_history_chars=300))
    assert repl("while True: pass") == "TimeoutError: the code ran longer than 1 seconds"
    out = repl("print('a' * 10000)")
    assert len(out) == 50 and out.endswith("[truncated]")
    assert "limit is 200" in repl("x = 1  #" + " " * 300)
    assert repl("big = 'b' * 100  # " + "c" * 150) == ""
    assert "history passed 300 characters" in repl("z = 2  # " + "d" * 150)
    assert "empty python call" in repl("   ")
    assert repl.cells == ["print('a' * 10000)", "big = 'b' * 100  # " + "c" * 150]  # not the timed-out or refused ones
    mem = PythonREPL(PythonLimits(timeout=10, max_memory_bytes=128 * 2**20))
    assert mem("a = bytearray(10**9)") == "MemoryError: the code used more than 128 MiB" and mem.cells == []


def test_registry_sessions_and_switches():
    searches = []
    reg = ToolRegistry(searcher=lambda q: searches.append(q) or f"found {q}")
    assert reg.names == ["calculator", "python", "search"]
    s = reg.session()
    # every call gets an answer: the tool's, or an error that says why there is none (never None: the model
    # would go on to write one itself)
    assert s("6*7") == "42" and s("hello") == CALCULATOR_REFUSED and s("search: owls") == "found owls"
    assert s.calls == [("calculator", "6*7", "42"), ("calculator", "hello", CALCULATOR_REFUSED),
                       ("search", "owls", "found owls")]
    off = NO_TOOLS.session()
    assert NO_TOOLS.names == []
    assert ([off(c) for c in ("6*7", "python: 1", "search: x")]
            == [UNAVAILABLE[n] for n in ("calculator", "python", "search")])
    assert ToolRegistry().session()("search: x") == UNAVAILABLE["search"]  # no index: search is off
    assert "not available" in UNAVAILABLE["search"] and "no search index" in UNAVAILABLE["search"]


# --- search ---------------------------------------------------------------------------------------

DOCS = [("a", "Velmora is an island. Its capital is Tarsk.\n\nIt was founded in 1742."),
        ("b", "The heron is a bird that wades in shallow water and eats fish."),
        ("c", "Pumpkins are orange. " * 50)]


def test_split_passages_bounds():
    text = "Short one.\n\n" + "A sentence here. " * 100 + "\n\n" + "x" * 1200
    ps = split_passages(text, max_chars=200)
    assert all(len(p) <= 200 for p in ps)
    assert "".join(ps).replace(" ", "") == text.replace(" ", "").replace("\n", "")
    assert split_passages("a b\n\nc", 100) == ["a b c"]


def test_index_builds_and_answers(tmp_path):
    path = str(tmp_path / "idx" / "passages.sqlite")
    stats = build_index(DOCS, path, max_chars=300)
    assert stats["documents"] == 3 and stats["passages"] >= 4 and os.listdir(tmp_path / "idx") == ["passages.sqlite"]
    s = Searcher(str(tmp_path / "idx"), k=2, max_chars=200)
    hits = s.search("what is the capital of Velmora?")
    assert hits[0][1] == "a" and "Tarsk" in hits[0][2] and hits[0][0] > 0
    assert s.search("capitals")[0][1] == "a"  # stemmed
    assert s.search("heron OR NOT NEAR(") [0][1] == "b"  # operators in a query are only words
    out = s("Velmora capital")
    assert out.startswith("[1] Velmora is an island. Its capital is Tarsk.") and len(out) <= 200
    assert s("zzyzx") == "search: no passage matches 'zzyzx'"
    assert "empty query" in s("  ") and match_expression("?!") is None
    with pytest.raises(FileNotFoundError, match="build_index"):
        Searcher(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no text to index"):
        build_index([("x", "   ")], str(tmp_path / "empty.sqlite"))
    assert not any(n.startswith("empty.sqlite") for n in os.listdir(tmp_path))


def test_build_index_script(tmp_path, monkeypatch):
    from scripts.build_index import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("The moon of Zorbin is called Plimp.")
    (src / "sub" / "more.jsonl").write_text(json.dumps({"text": "Grobnar sells blue kettles."}) + "\n\n"
                                            + json.dumps("plain string doc") + "\n")
    (src / "skip.bin").write_bytes(b"\x00\x01")
    stats = main(["--input", str(src), "--facts"])
    from tasks.tools import fact_documents
    assert stats["documents"] == 3 + len(fact_documents())
    s = Searcher(str(tmp_path / "base" / "search_index"))
    assert s.search("Grobnar kettles")[0][1] == "sub/more.jsonl:1"
    assert s.search("moon Zorbin")[0][1] == "notes.txt"
    name, doc = fact_documents()[7]
    assert s.search(doc.split(".")[0])[0][1] == name
    (src / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: invalid JSON"):
        main(["--input", str(src), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="nothing to index"):
        main([])


# --- tasks ---------------------------------------------------------------------------------------

def test_tool_tasks_are_verifiable_and_held_out():
    from tasks.tools import GROUPS, ToolsEval, ToolUse, final_answer
    ev = ToolsEval()
    assert len(ev) >= 60 and {c["group"] for c in ev} == set(GROUPS)
    train = ToolUse(size=600)
    train_qs = {c["messages"][0]["content"] for c in train}
    assert not train_qs & {c["messages"][0]["content"] for c in ev}
    for c in list(train)[:9] + list(ev)[:3]:
        parts = c["messages"][1]["content"]
        assert final_answer(parts[-1]["text"]) == c["answer"].lower()
        ids, mask = TOK.render_conversation(c)
        assert sum(mask) > 0
    assert ev.evaluate(ev[0], "so\n\n#### " + ev[0]["answer"]) and not ev.evaluate(ev[0], "#### nope")
    assert final_answer("#### 1,234.") == "1234" and final_answer("no answer") is None


def test_python_conversations_match_the_real_repl():
    """Every python form's tool output in the training data is what the REPL really prints."""
    import random

    from tasks.tools import PYTHON_FORMS, _python_problem
    rng = random.Random(3)
    for form in range(PYTHON_FORMS):
        group, q, parts, answer = _python_problem(rng, form)
        repl = PythonREPL(PythonLimits(timeout=10))
        for call, out in zip(parts, parts[1:]):
            if call["type"] == "python":
                name, code = parse_call(call["text"])
                assert name == "python" and out["type"] == "python_output"
                assert repl(code) == out["text"], (q, code)


def test_tool_conversations_call_then_quote():
    """Every tool conversation has the one shape: a line, the call, its output, then the answer line, which
    is copied from the output; a calculator call is the question's expression as written."""
    from tasks.tools import ToolUse, final_answer
    for kind in ("calculator", "python", "search"):
        for c in ToolUse(size=30, kinds=(kind,)):
            parts = c["messages"][1]["content"]
            assert parts[-1] == {"type": "text", "text": "#### " + c["answer"]}
            assert parts[-2]["type"] == "python_output" and c["answer"] in parts[-2]["text"]
            assert final_answer(parts[-1]["text"]) == c["answer"].lower()
            if kind == "calculator":
                assert parts[1]["text"] in c["messages"][0]["content"]


def test_search_conversations_quote_the_indexed_document(tmp_path):
    """The query is the question; the output is formatted like the real tool's, the entity's document
    first; and a real index of the fact corpus does put that document first, for the held-out questions too."""
    from nanochat.tools.search import format_passages
    from tasks.tools import ToolsEval, ToolUse, entities, fact_documents
    docs = {d for _, d in fact_documents()}
    test_names = {e[1] for e in entities("test")}
    build_index(fact_documents(), str(tmp_path / "facts.sqlite"))
    searcher = Searcher(str(tmp_path / "facts.sqlite"))
    for c in ToolUse(size=60, kinds=("search",)):
        q = c["messages"][0]["content"]
        call, out = c["messages"][1]["content"][1:3]
        assert call["text"] == "search: " + q
        passages = [line.split("] ", 1)[1] for line in out["text"].split("\n")]
        assert len(passages) == 2 and all(p in docs for p in passages) and c["answer"] in passages[0]
        assert out["text"] == format_passages(passages)
        assert not any(n in p for p in passages for n in test_names)
        assert searcher(q).split("\n")[0] == out["text"].split("\n")[0]  # what the real tool answers first
    for c in ToolsEval(group="facts"):
        assert c["answer"] in searcher(c["messages"][0]["content"]).split("\n")[0]


def test_copy_drill_answers_only_by_copying():
    """Every drill answer is in the conversation already: an echo repeats the user's payload, a calculator
    call is the question's expression and the answer its output, a search is about a newly invented entity
    (not in the indexed corpus) whose document is the first passage and holds the answer."""
    from tasks.mixtures import build_tasks
    from tasks.tools import CopyDrill, ToolsEval, fact_documents, final_answer
    corpus = " ".join(d for _, d in fact_documents())
    held_out = {c["messages"][0]["content"] for c in ToolsEval()}
    drill = CopyDrill(size=40, turns=3)
    kinds = set()
    for c in drill:
        msgs = c["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
        for user, reply in zip(msgs[::2], msgs[1::2]):
            q, parts = user["content"], reply["content"]
            assert q not in held_out
            if q.startswith("Repeat exactly: "):
                kinds.add("echo")
                assert parts == [{"type": "text", "text": q[len("Repeat exactly: "):]}]
                continue
            call, out, final = parts[1]["text"], parts[2]["text"], final_answer(parts[3]["text"])
            if call.startswith("search: "):
                kinds.add("search")
                first = out.split("\n")[0].split("] ", 1)[1]
                assert call == "search: " + q and final in first.lower() and first not in corpus
            else:
                kinds.add("calc")
                assert call in q and final == out.lower()
        ids, mask = TOK.render_conversation(c)
        assert sum(mask) > 0
    assert kinds == {"echo", "search", "calc"}
    assert [c["messages"] for c in CopyDrill(size=3)] == [c["messages"] for c in list(drill)[:3]]  # deterministic
    (task,) = build_tasks("copy", "mid", max_per_task=5)
    assert isinstance(task, CopyDrill) and len(task) == 5
    with pytest.raises(ValueError, match="turns"):
        CopyDrill(turns=0)


def test_mixture_has_tools():
    from tasks.mixtures import build_tasks, describe_tasks
    from tasks.tools import ToolUse
    tasks = build_tasks("tools", "mid", max_per_task=10)  # the cap holds for the three tools together
    assert len(tasks) == 1 and isinstance(tasks[0], ToolUse) and len(tasks[0]) == 10
    assert describe_tasks(tasks) == {"ToolUse(calculator,python,search)": 10}
    qs = [ex["messages"][0]["content"] for t in build_tasks("tools@6*2", "mid") for ex in t]
    assert len(qs) == 12 and len(set(qs)) == 6  # a repeat repeats the same problems


# --- end to end through the engine ---------------------------------------------------------------

class SegmentModel(nn.Module):
    """A fake model that writes `segments[i]` after the i-th <|output_end|> of its row (segments[0] right
    after the prompt), then <|assistant_end|>. It reads every token it is fed, forced ones included."""

    def __init__(self, segments, seq_len=512):
        super().__init__()
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.segments = segments
        self.hist = None
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, idx, kv_cache=None, logits_at=None):
        if idx.size(1) > 1 or self.hist is None:  # a prefill: a new generation
            self.prompt_len, self.hist = idx.size(1), [idx[0].tolist()]
        else:
            if len(self.hist) != idx.size(0):
                self.hist = [list(self.hist[0]) for _ in range(idx.size(0))]
            for row, t in zip(self.hist, idx[:, 0].tolist()):
                row.append(t)
        logits = torch.full((idx.size(0), idx.size(1), V), -20.0)
        for r in range(idx.size(0)):
            h = self.hist[min(r, len(self.hist) - 1)][self.prompt_len:]
            n_out = h.count(OUT_END)
            since = len(h) - (len(h) - h[::-1].index(OUT_END) if OUT_END in h else 0)
            seg = self.segments[n_out] if n_out < len(self.segments) else []
            logits[r, -1, seg[since] if since < len(seg) else A_END] = 20.0
        return at_positions(logits, logits_at)


def call(text):
    return [PY_START] + TOK.encode(text) + [PY_END]


def run(engine, num_samples=1):
    results, masks = engine.generate_batch([BOS, A_START], num_samples=num_samples, max_tokens=300, temperature=0.0)
    return [TOK.decode(r) for r in results], masks


def test_engine_python_state_across_calls():
    model = SegmentModel([call("python:\nx = 6"), call("python: x * 7"), TOK.encode("ok")])
    texts, masks = run(Engine(model, TOK, tools=ToolRegistry()), num_samples=2)
    expected = ("<|python_start|>python:\nx = 6<|python_end|><|output_start|><|output_end|>"
                "<|python_start|>python: x * 7<|python_end|><|output_start|>42<|output_end|>ok")
    assert texts == [expected, expected]
    forced = [i for i, m in enumerate(masks[0]) if m == 0]
    assert len(forced) == 2 + 4  # two empty outputs' markers, then <|output_start|>42<|output_end|>


def test_engine_python_state_across_turns():
    """A new reply's REPL starts from the python calls already in the conversation (the prompt)."""
    convo = {"messages": [
        {"role": "user", "content": "remember"},
        {"role": "assistant", "content": [{"type": "python", "text": "python:\nx = 6"},
                                          {"type": "python_output", "text": ""},
                                          {"type": "python", "text": "python: y = 1/0"},
                                          {"type": "python_output", "text": "ZeroDivisionError: division by zero"},
                                          {"type": "python", "text": "python: while True: pass"},
                                          {"type": "python_output",
                                           "text": "TimeoutError: the code ran longer than 5 seconds"},
                                          {"type": "text", "text": "ok"}]},
        {"role": "user", "content": "use it"}]}
    prompt = TOK.render_for_completion(convo)
    model = SegmentModel([call("python: x * 7"), TOK.encode("done")])
    engine = Engine(model, TOK, tools=ToolRegistry())
    assert engine._prompt_calls(prompt) == [
        ("python:\nx = 6", ""), ("python: y = 1/0", "ZeroDivisionError: division by zero"),
        ("python: while True: pass", "TimeoutError: the code ran longer than 5 seconds")]
    results, _ = engine.generate_batch(prompt, max_tokens=100, temperature=0.0)
    assert TOK.decode(results[0]).endswith("<|output_start|>42<|output_end|>done")


def test_engine_python_errors_and_tools_off():
    model = SegmentModel([call("python: undefined_name"), TOK.encode("ok")])
    (text,), _ = run(Engine(model, TOK, tools=ToolRegistry()))
    assert "<|output_start|>NameError: name 'undefined_name' is not defined<|output_end|>ok" in text
    # the tool is off: the call is answered so (forced, mask 0), and the model goes on from that answer
    (text,), masks = run(Engine(SegmentModel([call("python: 1+1"), TOK.encode("ok")]), TOK, tools=NO_TOOLS))
    assert text == f"<|python_start|>python: 1+1<|python_end|><|output_start|>{UNAVAILABLE['python']}<|output_end|>ok"
    assert masks[0].count(0) == len(TOK.encode(UNAVAILABLE["python"])) + 2
    # no tools at all (tools=None, what evals use to switch tools off): nothing is forced
    (text,), masks = run(Engine(SegmentModel([call("python: 1+1"), TOK.encode("ok")]), TOK))
    assert text == "<|python_start|>python: 1+1<|python_end|>" and set(masks[0]) == {1}


def test_engine_search_tool(tmp_path):
    build_index(DOCS, str(tmp_path / "i.sqlite"))
    tools = ToolRegistry(python=False, searcher=Searcher(str(tmp_path / "i.sqlite"), k=1))
    (text,), _ = run(Engine(SegmentModel([call("search: capital of Velmora"), TOK.encode("Tarsk")]), TOK, tools=tools))
    assert text == ("<|python_start|>search: capital of Velmora<|python_end|><|output_start|>[1] Velmora is an island. "
                    "Its capital is Tarsk. It was founded in 1742.<|output_end|>Tarsk")


def context_gpt(seq_len=128):
    """A small GPT whose output depends on its whole context (zero-init projections would make it read
    only the current token)."""
    torch.manual_seed(5)
    gpt = GPT(GPTConfig(sequence_len=seq_len, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=128))
    with torch.no_grad():
        for block in gpt.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        nn.init.normal_(gpt.lm_head.weight, std=0.1)
    return gpt.eval()


class RiggedGPT(nn.Module):
    """A real GPT whose choice is overridden on the tokens of `script` (token -> next: the call's characters
    must be distinct), so it makes one tool call; what it writes afterwards is its own and depends on everything
    in its KV cache."""

    def __init__(self, script):
        super().__init__()
        self.gpt = context_gpt()
        self.script, self.config = script, self.gpt.config

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None, logits_at=None):
        logits = self.gpt(idx, kv_cache=kv_cache).clone()
        logits[..., [A_END, BOS, PY_START]] = -30.0
        for a, nxt in self.script.items():
            hit = idx == a
            logits[hit] = -30.0
            logits[..., nxt][hit] = 30.0
        return at_positions(logits, logits_at)


def test_forced_tool_output_is_in_the_kv_cache():
    ids, output = call("python: 6*7"), "42"
    model = RiggedGPT({A_START: PY_START, **dict(zip(ids, ids[1:]))})
    prompt = [BOS] + TOK.encode("Q?") + [A_START]
    rows, masks = Engine(model, TOK, tools=ToolRegistry()).generate_batch(
        prompt, max_tokens=len(ids) + len(output) + 12, temperature=0.0)
    expected_forced = [OUT_START] + TOK.encode(output) + [OUT_END]
    assert rows[0][:len(ids) + len(expected_forced)] == ids + expected_forced
    assert masks[0] == [1] * len(ids) + [0] * len(expected_forced) + [1] * 10
    # the free continuation equals a full recompute of the whole sequence, token by token
    seq = prompt + rows[0][:len(ids) + len(expected_forced)]
    with torch.no_grad():
        for tok in rows[0][len(ids) + len(expected_forced):]:
            assert int(model(torch.tensor([seq]))[0, -1].argmax()) == tok
            seq.append(tok)


# --- chat_eval -a tools, RAG bpb -----------------------------------------------------------------

def test_rag_bpb_uses_the_passages(byte_tokenizer):
    from nanochat.loss_eval import rag_bpb
    tiny_model = context_gpt(seq_len=64)
    token_bytes = byte_tokenizer.token_bytes()
    docs = ["The quick brown fox jumps over the lazy dog. " * 4, "too short"]
    seen = []
    same = rag_bpb(tiny_model, byte_tokenizer, docs, lambda q: seen.append(q) or "", token_bytes,
                   prefix_tokens=20, target_tokens=30)
    assert same["documents"] == 1 and seen == [docs[0][:20]]
    other = rag_bpb(tiny_model, byte_tokenizer, docs, lambda q: "zebra " * 5, token_bytes,
                    prefix_tokens=20, target_tokens=30)
    assert other["bpb_without"] == pytest.approx(same["bpb_without"]) and other["bpb_with"] != same["bpb_with"]
    with pytest.raises(ValueError, match="no document"):
        rag_bpb(tiny_model, byte_tokenizer, ["short"], lambda q: "", token_bytes)


def test_chat_eval_tools_end_to_end(base_dir, byte_tokenizer):
    import dataclasses
    import subprocess
    import sys

    from nanochat.checkpoint_manager import save_checkpoint
    from scripts.build_index import main as build
    cfg = GPTConfig(sequence_len=256, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d1"), 5, GPT(cfg).state_dict(), None,
                    {"step": 5, "model_config": dataclasses.asdict(cfg)})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-a", "tools", "-x", "2", "-m", "4",
           "--rag-docs", "3", "--device-type", "cpu"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "no search index" in p.stderr + p.stdout
    build(["--shards", "--facts"])
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for line in ("tools/math (on): ", "tools/facts (off): ", "group     tools on  tools off",
                 "RAG bpb on 3 held-out documents"):
        assert line in p.stdout
    with open(os.path.join(base_dir, "report", "chat-evaluation-sft.json")) as f:
        rep = json.load(f)
    assert set(rep["summary"]) == {"Tools (on)", "Tools (off)"}


def test_chat_eval_tools_gives_room_for_the_tool_output(tmp_path):
    """A search answer is longer than -m; the reply still reaches its answer line with the tools on
    (the forced output does not eat the model's own budget), and off it has nothing to quote."""
    import types

    from scripts.chat_eval import run_tools
    from tasks.tools import ToolsEval, fact_documents
    build_index(fact_documents(), str(tmp_path / "facts.sqlite"))
    problem = ToolsEval(group="facts")[0]
    segments = [call("search: " + problem["messages"][0]["content"]), TOK.encode("#### " + problem["answer"])]
    assert len(TOK.encode(Searcher(str(tmp_path / "facts.sqlite"))(problem["messages"][0]["content"]))) > 128
    args = types.SimpleNamespace(num_samples=1, max_new_tokens=128, temperature=0.0, top_k=50, max_problems=1,
                                 rag_docs=0)
    out = run_tools(args, SegmentModel(segments, seq_len=1024), TOK, str(tmp_path / "facts.sqlite"), 0, 1,
                    torch.device("cpu"))
    assert out["groups"][("facts", "on")]["correct"] == 1 and out["groups"][("facts", "off")]["correct"] == 0


def test_chat_cli_shows_each_call_with_its_tool(tmp_path):
    import io

    from scripts.chat_cli import chat_turn
    build_index(DOCS, str(tmp_path / "i.sqlite"))
    tools = ToolRegistry(searcher=Searcher(str(tmp_path / "i.sqlite"), k=1, max_chars=60))
    model = SegmentModel([call("python: 6*7"), call("search: heron"), TOK.encode("ok")])
    out = io.StringIO()
    reply = chat_turn(Engine(model, TOK, tools=tools), TOK, [{"role": "user", "content": "hi"}], temperature=0.0,
                      out=out)
    assert out.getvalue() == ("[python: 6*7 → 42]"
                              "[search: heron → [1] The heron is a bird that wades in shallow water and...]ok\n")
    assert [p["type"] for p in reply] == ["python", "python_output", "python", "python_output", "text"]
    assert reply[2]["text"] == "search: heron"


def test_common_words_leave_queries(tmp_path):
    docs = [(str(i), f"the cat number {i} sat on the mat") for i in range(1200)] + [("z", "the zebra ate grass")]
    build_index(docs, str(tmp_path / "c.sqlite"))
    s = Searcher(str(tmp_path / "c.sqlite"), k=1)
    assert {"the", "cat", "mat"} <= s.common.keys() and "zebra" not in s.common
    assert match_expression("the zebra", common=s.common) == '"zebra"'
    assert match_expression("the cat mat", common={"the": 9, "cat": 3, "mat": 5}) == '"cat" OR "mat"'  # the rarest two
    assert s.search("the zebra")[0][1] == "z" and s.search("number 77")[0][1] == "77"
