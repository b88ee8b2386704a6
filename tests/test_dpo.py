"""DPO: the loss against hand-computed values, reply-only masks, pairs from sampled answers, pairs files,
and chat_dpo end to end in subprocesses (frozen reference, exact kill-and-resume, chat_eval -i dpo)."""
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.dpo import (
    preference_loss,
    reference_logprobs,
    render_pair,
    render_reply,
    sequence_logprobs,
    tokens_to_parts,
)
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tools.registry import ToolRegistry
from tasks.common import Task, extract_final_number
from tasks.preference import pairs_from_samples, read_pairs, sample_pairs, validate_pair, write_pairs
from tests.conftest import at_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

REPLY_WITH_TOOL = [{"type": "text", "text": "3 apples "}, {"type": "python", "text": "3*2"},
                   {"type": "python_output", "text": "6"}, {"type": "text", "text": " so #### 6"}]


def make_pair(i=0):
    return {"prompt": [{"role": "user", "content": f"Q{i}: 3*2?"}], "chosen": f"#### 6 ({i})",
            "rejected": f"#### 5 ({i})"}


# ---------------------------------------------------------------------------------------------
# masks and log-probs

def test_reply_mask_excludes_prompt_earlier_turns_and_tool_output(byte_tokenizer):
    T = byte_tokenizer
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "apples?"}]
    ids, mask = render_reply(T, prompt, REPLY_WITH_TOOL, max_tokens=10**6)
    n_prompt = len(T.render_for_completion({"messages": prompt}))
    assert ids[:n_prompt] == T.render_for_completion({"messages": prompt})
    assert not any(mask[:n_prompt])  # the earlier assistant turn "hello" is context, not trained
    supervised = T.decode([t for t, m in zip(ids, mask) if m])
    assert supervised == "3 apples <|python_start|>3*2<|python_end|> so #### 6<|assistant_end|>"
    # truncation drops the start of the prompt, never the reply
    short_ids, short_mask = render_reply(T, prompt, REPLY_WITH_TOOL, max_tokens=len(ids) - 5)
    assert short_ids == ids[5:] and short_mask == mask[5:]
    with pytest.raises(ValueError, match="does not fit"):
        render_reply(T, prompt, REPLY_WITH_TOOL, max_tokens=len(ids) - n_prompt)


def test_sequence_logprobs_sum_only_reply_tokens(byte_tokenizer, tiny_model):
    T = byte_tokenizer
    ids, mask = render_reply(T, [{"role": "user", "content": "hi"}], "yo", 64)
    logp = sequence_logprobs(tiny_model, [(ids, mask)], T.get_bos_token_id(), "cpu")
    with torch.no_grad():
        lp = F.log_softmax(tiny_model(torch.tensor([ids[:-1]])), dim=-1)[0]
    want = sum(lp[j - 1, ids[j]].item() for j in range(1, len(ids)) if mask[j])
    assert sum(mask) == 3  # "y", "o", <|assistant_end|>
    assert logp.item() == pytest.approx(want, abs=1e-4)
    # changing the prompt's text changes the context but the reply is still what is summed
    ids2, mask2 = render_reply(T, [{"role": "user", "content": "hey there"}], "yo", 64)
    assert sum(mask2) == 3


def test_dpo_and_ipo_loss_match_hand_computed_values(byte_tokenizer, tiny_model):
    T = byte_tokenizer
    pair = make_pair()
    (c_ids, c_mask), (r_ids, r_mask) = render_pair(T, pair, 64)
    pad = T.get_bos_token_id()
    pc = sequence_logprobs(tiny_model, [(c_ids, c_mask)], pad, "cpu")
    pr = sequence_logprobs(tiny_model, [(r_ids, r_mask)], pad, "cpu")
    ref_c, ref_r = torch.tensor([-30.0]), torch.tensor([-28.5])
    beta = 0.5
    h = (pc.item() - (-30.0)) - (pr.item() - (-28.5))
    loss, cr, rr = preference_loss(pc, pr, ref_c, ref_r, beta, "sigmoid")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-beta * h)), rel=1e-5)
    assert cr.item() == pytest.approx(beta * (pc.item() + 30.0), rel=1e-5)
    assert (cr - rr).item() == pytest.approx(beta * h, rel=1e-5)
    loss, _, _ = preference_loss(pc, pr, ref_c, ref_r, beta, "ipo")
    assert loss.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-5)
    # at the reference the DPO loss is log 2 and its gradient pushes chosen up, rejected down
    loss, _, _ = preference_loss(pc, pr, pc.detach(), pr.detach(), beta, "sigmoid")
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    pc_leaf, pr_leaf = pc.detach().requires_grad_(), pr.detach().requires_grad_()
    preference_loss(pc_leaf, pr_leaf, pc.detach(), pr.detach(), beta)[0].sum().backward()
    assert pc_leaf.grad.item() == pytest.approx(-beta / 2) and pr_leaf.grad.item() == pytest.approx(beta / 2)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(pc, pr, ref_c, ref_r, beta, "hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference_loss(pc, pr, ref_c, ref_r, 0.0)


def test_dpo_steps_raise_the_margin_and_leave_the_reference_alone(byte_tokenizer, tiny_config):
    T = byte_tokenizer
    torch.manual_seed(0)
    model = GPT(tiny_config)
    reference = GPT(tiny_config)
    reference.load_state_dict(model.state_dict())
    ref_state = {k: v.clone() for k, v in reference.state_dict().items()}
    pairs = [make_pair(i) for i in range(4)]
    rendered = [render_pair(T, p, 64) for p in pairs]
    pad = T.get_bos_token_id()
    refs = torch.tensor(reference_logprobs(reference, rendered, pad, "cpu", batch_size=3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    margins = []
    for _ in range(15):
        rows = [c for c, _ in rendered] + [r for _, r in rendered]
        logp = sequence_logprobs(model, rows, pad, "cpu")
        loss, cr, rr = preference_loss(logp[:4], logp[4:], refs[:, 0], refs[:, 1], 0.1)
        margins.append((cr - rr).mean().item())
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
    assert margins[0] == pytest.approx(0.0, abs=1e-5) and margins[-1] > 0.5, margins
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert torch.allclose(torch.tensor(reference_logprobs(reference, rendered, pad, "cpu", batch_size=4)), refs,
                          atol=1e-5)


# ---------------------------------------------------------------------------------------------
# pairs

def test_tokens_to_parts_round_trips_through_the_renderer(byte_tokenizer):
    T = byte_tokenizer
    prompt = [{"role": "user", "content": "apples?"}]
    ids, _ = render_reply(T, prompt, REPLY_WITH_TOOL, 10**6)
    n_prompt = len(T.render_for_completion({"messages": prompt}))
    reply_tokens = ids[n_prompt:-1]  # without <|assistant_end|>, as the engine returns them
    assert tokens_to_parts(T, reply_tokens) == REPLY_WITH_TOOL
    assert tokens_to_parts(T, T.encode("plain")) == [{"type": "text", "text": "plain"}]


def test_pairs_from_samples_pairs_correct_with_wrong_and_drops_uniform_groups():
    prompt = [{"role": "user", "content": "q"}]
    pairs = pairs_from_samples(prompt, ["a", "b", "a", "c", "d"], [1, 0, 1, 1, 0], max_pairs=5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b"), ("c", "d")]  # the duplicate "a" counts once
    assert len(pairs_from_samples(prompt, ["a", "b", "c", "d"], [1, 0, 1, 0], max_pairs=1)) == 1
    assert pairs_from_samples(prompt, ["a", "b"], [1, 1], 3) == []
    assert pairs_from_samples(prompt, ["a", "b"], [0, 0], 3) == []


class Sum(Task):
    """'2+3?' style problems; the reward is the exact final number."""

    def __init__(self, answers, **kwargs):
        super().__init__(**kwargs)
        self.answers = answers

    def num_examples(self):
        return len(self.answers)

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"#### {self.answers[i]}"}],
                "answer": str(self.answers[i])}

    def reward(self, conversation, response):
        return int(extract_final_number(response) == conversation["answer"])


class CoinModel(nn.Module):
    """After <|assistant_start|> writes '2' or '3' with equal probability, then <|assistant_end|>."""

    def __init__(self, tokenizer):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                                n_kv_head=1, n_embd=8)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.start = tokenizer.encode_special("<|assistant_start|>")
        self.end = tokenizer.encode_special("<|assistant_end|>")
        self.digits = tokenizer.encode("2") + tokenizer.encode("3")
        self.last = None

    def get_device(self):
        return self.dummy.device

    def forward(self, idx, kv_cache=None, logits_at=None):
        logits = torch.full((idx.size(0), idx.size(1), self.config.vocab_size), -50.0)
        for b in range(idx.size(0)):
            if idx[b, -1].item() == self.start:
                logits[b, -1, self.digits] = 0.0
            else:
                logits[b, -1, self.end] = 0.0
        return at_positions(logits, logits_at)


def test_sample_pairs_from_checkable_problems(byte_tokenizer):
    T = byte_tokenizer
    task = Sum([2, 3, 7])  # 7: never right -> dropped
    engine = Engine(CoinModel(T), T, tools=ToolRegistry())
    pairs, stats = sample_pairs(task, [0, 1, 2], engine, T, num_samples=8, max_new_tokens=4, temperature=1.0,
                                top_k=None, seed=5, max_pairs=2)
    assert stats["problems"] == 3 and stats["samples"] == 24 and stats["none_correct"] == 1
    assert {p["problem"] for p in pairs} == {0, 1}
    for p in pairs:
        want = str(task.answers[p["problem"]])
        assert p["chosen"] == [{"type": "text", "text": want}] and p["rejected"][0]["text"] in "23"
        assert p["rejected"][0]["text"] != want and p["prompt"] == [{"role": "user", "content": f"q{p['problem']}"}]
        validate_pair(p)


def test_pairs_file_round_trip_and_validation(tmp_path):
    path = str(tmp_path / "pairs.jsonl")
    pairs = [make_pair(0),
             {**make_pair(1), "chosen": REPLY_WITH_TOOL, "ref_chosen": -3.5, "ref_rejected": -2.0, "note": "é"}]
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    # the conversational form and a bare prompt string are accepted and normalized
    conv = {"prompt": "hi", "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}
    assert validate_pair(conv) == {"prompt": [{"role": "user", "content": "hi"}], "chosen": "good", "rejected": "bad"}

    def bad(obj, match):
        with open(path, "w") as f:
            f.write(json.dumps(make_pair(0)) + "\n\n" + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        with pytest.raises(ValueError, match=match):
            read_pairs(path)

    bad("{not json", r"pairs.jsonl:3: invalid JSON")
    bad({"prompt": "x", "chosen": "a"}, r":3: missing 'rejected'")
    bad({**make_pair(), "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        r":3: 'prompt' must end with a user message")
    bad({**make_pair(), "rejected": make_pair()["chosen"]}, "the same reply")
    bad({**make_pair(), "chosen": 5}, "'chosen' must be a string")
    bad({**make_pair(), "rejected": [{"type": "code", "text": "x"}]}, r"prompt \+ rejected: message 1 part 0")
    bad({**make_pair(), "ref_chosen": -1.0}, "must both be numbers")
    bad({**make_pair(), "chosen": [{"role": "user", "content": "x"}]}, "must be an assistant reply")
    with open(path, "w") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(path)
    with pytest.raises(FileNotFoundError, match="no pairs file"):
        read_pairs(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------
# chat_dpo end to end

def run(base, args, ok=True):
    """python -m args in a folder of the test's own (report generate copies report.md into the working folder:
    run from the checkout, it would overwrite a user's report), with this checkout's code first on the path."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m"] + args
    p = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def dpo_base(base_dir, byte_tokenizer, tmp_path):
    """A tiny sft checkpoint, a JSONL of pairs and a JSONL of math problems."""
    from nanochat.checkpoint_manager import save_checkpoint
    cfg = GPTConfig(sequence_len=64, vocab_size=byte_tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                    n_embd=32)
    torch.manual_seed(0)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d1"), 5, GPT(cfg).state_dict(), None,
                    {"step": 5, "model_config": dataclasses.asdict(cfg)})
    pairs_file, math_file = tmp_path / "pairs.jsonl", tmp_path / "math.jsonl"
    write_pairs(str(pairs_file), [make_pair(i) for i in range(20)])
    with open(math_file, "w") as f:
        for a, b in [(1, 1), (2, 3)]:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": f"#### {a + b}"}],
                                "answer": a + b}) + "\n")
    return base_dir, str(pairs_file), str(math_file)


FLAGS = ["scripts.chat_dpo", "--device-type", "cpu", "--num-iterations", "6", "--pairs-per-step", "4",
         "--device-batch-size", "2", "--val-pairs", "2", "--eval-problems", "2", "--eval-samples", "2",
         "--max-new-tokens", "4", "--init-lr-frac", "1.0", "--beta", "0.5", "--dtype", "float32", "--compile", "off"]


def test_chat_dpo_end_to_end_reference_frozen_and_eval(dpo_base):
    from nanochat.checkpoint_manager import complete_steps, load_model
    from nanochat.tokenizer import get_tokenizer
    base, pairs_file, math_file = dpo_base
    sft_file = os.path.join(base, "chatsft_checkpoints", "d1", "model_000005.pt")
    before = sha(sft_file)
    p = run(base, FLAGS + ["--pairs", pairs_file, "--task-file", math_file,
                           "--loss-file", os.path.join(base, "l.jsonl")])
    assert "margin" in p.stdout and "eta" in p.stdout and "pass@1" in p.stdout
    ckpt = os.path.join(base, "chatdpo_checkpoints", "d1")
    assert complete_steps(ckpt) == [6]
    hist = [json.loads(line) for line in open(os.path.join(base, "l.jsonl"))]
    assert hist[0]["margin"] == pytest.approx(0.0, abs=1e-4) and hist[-1]["margin"] > hist[0]["margin"]
    # the reference is the sft model, untouched, and its cached log-probs are what it scores now
    assert sha(sft_file) == before
    cached = read_pairs(os.path.join(ckpt, "pairs.jsonl"))
    assert len(cached) == 20 and all("ref_chosen" in c for c in cached)
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        sft, _, _ = load_model("sft", "cpu", "eval")
        dpo, _, meta = load_model("dpo", "cpu", "eval")
        tok = get_tokenizer()
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    refs = reference_logprobs(sft, [render_pair(tok, c, 65) for c in cached], tok.get_bos_token_id(), "cpu", 8)
    for c, (rc, rr) in zip(cached, refs):
        assert c["ref_chosen"] == pytest.approx(rc, abs=1e-4) and c["ref_rejected"] == pytest.approx(rr, abs=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(dpo.state_dict().values(), sft.state_dict().values()))
    assert meta["source"] == {"stage": "sft", "tag": "d1", "step": 5}
    with open(os.path.join(base, "report", "chat-dpo.json")) as f:
        rep = json.load(f)
    assert rep["stage"] == "DPO" and "GSM8K pass@1" in rep["summary"]
    assert os.path.getsize(os.path.join(base, "report", "chat_dpo_margin.png")) > 1000
    # chat_eval reads the DPO model, and the report summary grows a DPO column
    run(base, ["scripts.chat_eval", "-i", "dpo", "--task-file", math_file, "-m", "4", "--device-type", "cpu"])
    run(base, ["nanochat.report", "generate"])
    assert os.path.exists(os.path.join(base, "report.md"))  # the copy lands in the working folder, not the checkout
    report = open(os.path.join(base, "report", "report.md")).read()
    assert "| Metric | BASE | MID | SFT | RL | DPO | CL |" in report


def test_chat_dpo_kill_and_resume_matches_uninterrupted(dpo_base, tmp_path):
    from nanochat.checkpoint_manager import complete_steps, model_path
    base, pairs_file, math_file = dpo_base
    flags = FLAGS + ["--eval-problems", "0", "--loss", "ipo"]
    full = os.path.join(base, "full.jsonl")
    run(base, flags + ["--pairs", pairs_file, "--loss-file", full])
    ckpt = os.path.join(base, "chatdpo_checkpoints", "d1")
    want_state = torch.load(model_path(ckpt, 6), weights_only=True)

    part = os.path.join(base, "part.jsonl")
    run(base, flags + ["--pairs", pairs_file, "--loss-file", part, "--save-every", "3", "--stop-after", "3"])
    assert complete_steps(ckpt) == [3]
    cached = sha(os.path.join(ckpt, "pairs.jsonl"))
    os.remove(pairs_file)  # a resumed run must neither sample nor read the user's file again
    run(base, flags + ["--loss-file", part, "--resume"])
    assert sha(os.path.join(ckpt, "pairs.jsonl")) == cached
    got, want = [json.loads(x) for x in open(part)], [json.loads(x) for x in open(full)]
    assert [g["step"] for g in got] == list(range(6))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4) and g["lrm"] == w["lrm"]
    got_state = torch.load(model_path(ckpt, 6), weights_only=True)
    for k in want_state:
        torch.testing.assert_close(got_state[k], want_state[k], rtol=1e-4, atol=1e-6)
    # resuming with other settings is refused, naming them
    p = run(base, flags + ["--resume", "--beta", "0.2"], ok=False)
    assert p.returncode != 0 and "beta" in p.stderr


def test_chat_dpo_rejects_a_bad_pairs_file(dpo_base, tmp_path):
    base, _, _ = dpo_base
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    p = run(base, FLAGS + ["--pairs", str(bad)], ok=False)
    assert p.returncode != 0 and "bad.jsonl:1: missing 'rejected'" in p.stderr
    p = run(base, FLAGS + ["--pairs", dpo_base[1], "--max-seq-len", "8"], ok=False)
    assert p.returncode != 0 and "pair 1: a reply of" in p.stderr and "does not fit in 9 tokens" in p.stderr


def test_chat_dpo_two_ranks(dpo_base):
    """torchrun with 2 (gloo) ranks: the reference scoring is split over the ranks and gathered back in
    pair order, and training runs and saves."""
    from nanochat.checkpoint_manager import complete_steps, load_model
    from nanochat.tokenizer import get_tokenizer
    base, pairs_file, _ = dpo_base
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "scripts.chat_dpo", "--"]
           + FLAGS[1:] + ["--pairs", pairs_file, "--eval-problems", "0", "--num-iterations", "2"])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    ckpt = os.path.join(base, "chatdpo_checkpoints", "d1")
    assert complete_steps(ckpt) == [2]
    cached = read_pairs(os.path.join(ckpt, "pairs.jsonl"))
    assert [c["prompt"] for c in cached] == [make_pair(i)["prompt"] for i in range(20)]
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        sft, _, _ = load_model("sft", "cpu", "eval")
        tok = get_tokenizer()
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    refs = reference_logprobs(sft, [render_pair(tok, c, 65) for c in cached], tok.get_bos_token_id(), "cpu", 8)
    assert [c["ref_chosen"] for c in cached] == pytest.approx([r[0] for r in refs], abs=1e-4)
    assert [c["ref_rejected"] for c in cached] == pytest.approx([r[1] for r in refs], abs=1e-4)
