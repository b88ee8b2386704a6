"""chat_eval (categorical + generative evaluators, ChatCORE) and chat_rl (GRPO pieces, learning on a
trivially learnable task, end to end) with rigged models, fake tasks and tiny checkpoints. No downloads."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nanochat.engine import Engine
from nanochat.tools.registry import ToolRegistry
from nanochat.gpt import GPT, GPTConfig
from tasks.evaluate import chatcore, run_categorical_eval, run_generative_eval
from scripts.chat_rl import (build_rl_batch, group_advantages, policy_gradient_loss, rollout, sample_completions,
                             train_on_rollout)
from tasks.common import MultipleChoiceTask, Task, extract_final_number, mc_conversation
from tests.conftest import at_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# fakes

class FakeMC(MultipleChoiceTask):
    """Multiple-choice items with 3-5 choices and given answer indices."""

    def __init__(self, answers, num_choices, **kwargs):
        super().__init__(**kwargs)
        self.items = list(zip(answers, num_choices))

    def num_examples(self):
        return len(self.items)

    def get_example(self, i):
        ans, n = self.items[i]
        return mc_conversation(f"Question number {i}{'?' * (i % 4)}", [f"choice {j}" for j in range(n)], ans)


class FakeMath(Task):
    """'What is a+b?' with the reference answer; scored by the final number."""

    def __init__(self, answers, **kwargs):
        super().__init__(**kwargs)
        self.answers = answers

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.answers)

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": str(self.answers[i])}],
                "answer": str(self.answers[i])}

    def evaluate(self, conversation, response):
        return int(extract_final_number(response) == conversation["answer"])

    reward = evaluate


class RiggedModel(nn.Module):
    """Logits = a fixed bias (prefers some tokens everywhere), plus, if a table is given, a large logit on
    table[previous token] (a deterministic next-token map). Ignores the KV cache."""

    def __init__(self, config, bias=None, table=None):
        super().__init__()
        self.config = config
        self.dummy = nn.Parameter(torch.zeros(1))
        self.bias = torch.zeros(config.vocab_size)
        for tok, v in (bias or {}).items():
            self.bias[tok] = v
        self.table = table or {}

    def get_device(self):
        return self.dummy.device

    def forward(self, idx, targets=None, kv_cache=None, logits_at=None):
        B, T = idx.shape
        logits = self.bias.expand(B, T, -1).clone()
        for b in range(B):
            for t in range(T):
                nxt = self.table.get(int(idx[b, t]))
                if nxt is not None:
                    logits[b, t, nxt] += 100.0
        return at_positions(logits, logits_at)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cfg(byte_tokenizer):
    return GPTConfig(sequence_len=128, vocab_size=byte_tokenizer.get_vocab_size(), n_layer=1, n_head=1,
                     n_kv_head=1, n_embd=64)


def tok(tokenizer, s):
    ids = tokenizer.encode(s) if len(s) == 1 else [tokenizer.encode_special(s)]
    assert len(ids) == 1
    return ids[0]


# ---------------------------------------------------------------------------------------------
# chat_eval

def test_categorical_eval_compares_only_letters(cfg, byte_tokenizer):
    T = byte_tokenizer
    answers = [1, 0, 1, 2, 1, 3, 0, 1, 4, 2]
    nchoices = [4, 3, 5, 4, 4, 4, 3, 5, 5, 3]
    task = FakeMC(answers, nchoices)
    want = sum(a == 1 for a in answers) / len(answers)
    chance = sum(1 / n for n in nchoices) / len(nchoices)
    for bias in ({tok(T, "B"): 5.0},  # prefers B
                 {tok(T, "x"): 10.0, tok(T, "B"): 5.0, tok(T, "<|assistant_end|>"): 9.0}):  # non-letters beat B
        model = RiggedModel(cfg, bias)
        for bs in (1, 3, 16):
            r = run_categorical_eval(task, model, T, batch_size=bs)
            assert r["accuracy"] == pytest.approx(want) and r["total"] == 10
            assert r["chance"] == pytest.approx(chance)
    # a letter beyond an item's choices ("E" on 3-choice items) never wins there; the item falls back
    # to the best of its own letters
    model = RiggedModel(cfg, {tok(T, "E"): 10.0, tok(T, "C"): 5.0})
    r = run_categorical_eval(task, model, T, batch_size=4, max_problems=4)
    # items 0..3: 4 choices -> C (wrong: 1), 3 -> C (wrong: 0), 5 -> E (wrong: 1), 4 -> C (right: 2)
    assert r["correct"] == 1 and r["total"] == 4


def test_categorical_eval_batching_matches_single(cfg, byte_tokenizer):
    """Right-padding does not change a prompt's last logits (real GPT, prompts of different lengths)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.1)
    model.eval()
    task = FakeMC([0, 1, 2, 3, 0, 1, 2, 0], [4, 4, 3, 4, 5, 3, 4, 5])
    a = run_categorical_eval(task, model, byte_tokenizer, batch_size=1)
    b = run_categorical_eval(task, model, byte_tokenizer, batch_size=8)
    assert a == b


def test_generative_eval_with_rigged_model(cfg, byte_tokenizer):
    T = byte_tokenizer
    # after <|assistant_start|> write "4", then stop
    table = {tok(T, "<|assistant_start|>"): tok(T, "4"), tok(T, "4"): tok(T, "<|assistant_end|>")}
    model = RiggedModel(cfg, table=table)
    task = FakeMath([4, 5, 4, 4, 7, 4])
    engine = Engine(model, T, tools=ToolRegistry())
    r = run_generative_eval(task, model, T, engine, num_samples=1, max_new_tokens=8, temperature=0.0)
    assert r == {"accuracy": pytest.approx(4 / 6), "correct": 4, "total": 6, "chance": 0.0}
    r = run_generative_eval(task, model, T, engine, num_samples=3, max_new_tokens=8, temperature=1.0, max_problems=2)
    assert (r["correct"], r["total"]) == (1, 2)
    # ChatCORE: mean of chance-centred accuracies
    res = {"mc": {"accuracy": 0.625, "chance": 0.25}, "gen": {"accuracy": 0.5, "chance": 0.0}}
    assert chatcore(res) == pytest.approx((0.5 + 0.5) / 2)


# ---------------------------------------------------------------------------------------------
# chat_rl pieces

def test_group_advantages():
    adv = group_advantages([1, 0, 0, 1, 1, 1])
    assert adv.tolist() == pytest.approx([1 / 3, -2 / 3, -2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert adv.sum().item() == pytest.approx(0, abs=1e-6)
    assert group_advantages([1, 1, 1]).tolist() == [0, 0, 0]


def test_build_rl_batch_masks_prompt_forced_and_padding():
    PAD = 99
    inputs, targets = build_rl_batch([[1, 2, 3], [5]], [[10, 11, 12, 13], [7]], [[1, 0, 0, 1], [1]], PAD)
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12], [5, PAD, PAD, PAD, PAD, PAD]]
    # row 0: the prompt's own tokens are never targets; 10 and 13 were sampled, 11 and 12 forced
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 13], [7, -1, -1, -1, -1, -1]]


def test_policy_gradient_loss_matches_manual(tiny_model):
    inputs, targets = build_rl_batch([[1, 2, 3], [5, 6]], [[10, 11, 12], [7, 8]], [[1, 0, 1], [1, 1]], 0)
    adv = torch.tensor([0.5, -0.5])
    loss = policy_gradient_loss(tiny_model, inputs, targets, adv, num_tokens=4)
    logp = torch.log_softmax(tiny_model(inputs), dim=-1)
    want = -(0.5 * (logp[0, 2, 10] + logp[0, 4, 12]) - 0.5 * (logp[1, 1, 7] + logp[1, 2, 8])) / 4
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)


def test_sample_completions_masks_tool_output(cfg, byte_tokenizer):
    T = byte_tokenizer
    S = T.encode_special
    # the model writes <|python_start|>3*4<|python_end|>, the tool forces <|output_start|>12<|output_end|>,
    # then the model ends the reply
    table = {S("<|assistant_start|>"): S("<|python_start|>"), S("<|python_start|>"): tok(T, "3"),
             tok(T, "3"): tok(T, "*"), tok(T, "*"): tok(T, "4"), tok(T, "4"): S("<|python_end|>"),
             S("<|output_end|>"): S("<|assistant_end|>")}
    engine = Engine(RiggedModel(cfg, table=table), T, tools=ToolRegistry())
    prompt = T.render_for_completion({"messages": [{"role": "user", "content": "3*4?"}]})
    toks, masks = sample_completions(engine, prompt, 2, 32, temperature=1.0, seed=1)
    want = [S("<|python_start|>"), tok(T, "3"), tok(T, "*"), tok(T, "4"), S("<|python_end|>"),
            S("<|output_start|>"), tok(T, "1"), tok(T, "2"), S("<|output_end|>"), S("<|assistant_end|>")]
    assert toks == [want, want]
    assert masks == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 1]] * 2
    inputs, targets = build_rl_batch([prompt], toks[:1], masks[:1], 0)
    trained = [t for t in targets[0].tolist() if t != -1]
    assert trained == [t for t, m in zip(want, masks[0]) if m]  # the tool's output is never trained on


class EvenFirstToken(Task):
    """Reward 1 if the reply's first byte has an even value: learnable by shifting mass at one position."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"go {i}"}]}

    def reward(self, conversation, response):
        b = response.encode("utf-8", errors="replace")[:1]
        return int(len(b) == 1 and b[0] % 2 == 0)


def test_rl_steps_increase_reward_probability(cfg, byte_tokenizer):
    T = byte_tokenizer
    torch.manual_seed(0)
    model = GPT(cfg)
    engine = Engine(model, T, tools=ToolRegistry())
    task = EvenFirstToken(4)
    even = torch.tensor([b % 2 == 0 for b in range(256)] + [False] * (cfg.vocab_size - 256))

    def p_even():
        with torch.no_grad():
            ps = []
            for i in range(len(task)):
                ids = torch.tensor([T.render_for_completion(task[i])])
                ps.append(torch.softmax(model(ids)[0, -1], -1)[even].sum().item())
        return sum(ps) / len(ps)

    optimizers = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.02)
    before = p_even()
    for step in range(6):
        data = rollout(task, range(len(task)), engine, T, num_samples=8, max_new_tokens=2, temperature=1.0,
                       top_k=None, seed=100 * step, context_len=cfg.sequence_len)
        train_on_rollout(model, data, "cpu", 16, T.encode_special("<|assistant_end|>"))
        for opt in optimizers.values():
            opt.step()
        model.zero_grad(set_to_none=True)
    after = p_even()
    assert after > before + 0.1, (before, after)


# ---------------------------------------------------------------------------------------------
# end to end in subprocesses

def run(base, args, nproc=1):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m"] + args
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", args[0], "--"] + args[1:]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if nproc > 1 and p.returncode != 0 and "terminate called without an active exception" in p.stderr:
        # an intermittent gloo abort seen only on a loaded shared CPU under pytest (not reproduced
        # standalone); one retry keeps the test meaningful without hiding real failures
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture
def sft_base(base_dir, cfg, tmp_path):
    """base_dir with a tiny sft checkpoint (d1, step 5) and two JSONL task files."""
    from nanochat.checkpoint_manager import save_checkpoint
    torch.manual_seed(0)
    model = GPT(cfg)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d1"), 5, model.state_dict(), None,
                    {"step": 5, "model_config": dataclasses.asdict(cfg)})
    math_file, mc_file = tmp_path / "tiny_math.jsonl", tmp_path / "tiny_mc.jsonl"
    with open(math_file, "w") as f:
        for a, b in [(1, 1), (2, 3), (4, 4), (0, 5)]:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": f"#### {a + b}"}], "answer": a + b}) + "\n")
    with open(mc_file, "w") as f:
        for i in range(5):
            f.write(json.dumps(mc_conversation(f"q{i}", ["x", "y", "z"], i % 3)) + "\n")
    return base_dir, str(math_file), str(mc_file)


def test_chat_eval_end_to_end(sft_base):
    base, math_file, mc_file = sft_base
    p = run(base, ["scripts.chat_eval", "-i", "sft", "--task-file", f"{math_file},{mc_file}", "-n", "2", "-t", "1.0",
                   "-m", "6", "--device-type", "cpu"])
    assert "ChatCORE" in p.stdout and "tiny_math" in p.stdout and "tiny_mc" in p.stdout
    with open(os.path.join(base, "report", "chat-evaluation-sft.json")) as f:
        rep = json.load(f)
    assert rep["stage"] == "SFT" and set(rep["summary"]) == {"tiny_math", "tiny_mc", "ChatCORE"}
    assert os.path.exists(os.path.join(base, "report", "chat-evaluation-sft.md"))


def test_chat_rl_end_to_end(sft_base):
    from nanochat.checkpoint_manager import complete_steps, load_model
    base, math_file, _ = sft_base
    p = run(base, ["scripts.chat_rl", "--task-file", math_file, "--num-steps", "2", "--prompts-per-step", "2",
                   "--num-samples", "4", "--max-new-tokens", "6", "--eval-every", "1", "--eval-problems", "2",
                   "--eval-samples", "2", "--save-every", "1", "--device-type", "cpu", "--init-lr-frac", "1.0"])
    assert "mean reward" in p.stdout and "pass@2" in p.stdout
    ckpt = os.path.join(base, "chatrl_checkpoints", "d1")
    assert complete_steps(ckpt) == [1, 2]
    model, _, meta = load_model("rl", "cpu", "eval")
    assert meta["step"] == 2 and meta["source"]["stage"] == "sft"
    # the weights moved
    sft, _, _ = load_model("sft", "cpu", "eval")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))
    with open(os.path.join(base, "report", "chat-rl.json")) as f:
        rep = json.load(f)
    assert rep["stage"] == "RL" and "GSM8K pass@1" in rep["summary"]
    assert os.path.getsize(os.path.join(base, "report", "chat_rl_reward.png")) > 1000


def test_two_ranks(sft_base):
    """torchrun with 2 (gloo) ranks: chat_eval splits problems and sums the counts; chat_rl runs and saves."""
    base, math_file, mc_file = sft_base
    flags = ["-i", "sft", "--task-file", f"{math_file},{mc_file}", "-m", "4", "--device-type", "cpu"]
    one = run(base, ["scripts.chat_eval", *flags]).stdout.splitlines()[-4:]
    two = run(base, ["scripts.chat_eval", *flags], nproc=2).stdout.splitlines()[-4:]
    assert one == two  # the same table: same per-task correct/total (greedy decoding, same model)
    assert one[1].startswith("tiny_math") and "/4 " in one[1] and one[2].startswith("tiny_mc") and "/5 " in one[2]
    run(base, ["scripts.chat_rl", "--task-file", math_file, "--num-steps", "1", "--prompts-per-step", "2",
               "--num-samples", "2", "--max-new-tokens", "4", "--eval-problems", "2", "--eval-samples", "2",
               "--device-type", "cpu"], nproc=2)
    from nanochat.checkpoint_manager import complete_steps
    assert complete_steps(os.path.join(base, "chatrl_checkpoints", "d1")) == [1]


def test_chat_eval_refuses_humaneval_without_a_sandbox(monkeypatch, capsys):
    from nanochat.sandbox import boundary as sandbox
    from scripts.chat_eval import check_code_execution
    monkeypatch.setattr(sandbox, "_isolation", (False, "bubblewrap is not installed"))
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "0")  # (recorded, so restored after)
    with pytest.raises(SystemExit, match="--unsafe-exec"):
        check_code_execution(unsafe_exec=False)
    check_code_execution(unsafe_exec=True)  # opted in: goes on, and says what that means
    assert "Python-level guards only" in capsys.readouterr().out
    assert os.environ[sandbox.UNSAFE_ENV] == "1"


def test_chat_rl_kill_and_resume_matches_uninterrupted(sft_base):
    from nanochat.checkpoint_manager import complete_steps, model_path
    base, math_file, _ = sft_base
    flags = ["scripts.chat_rl", "--task-file", math_file, "--num-steps", "3", "--prompts-per-step", "2",
             "--num-samples", "4", "--max-new-tokens", "6", "--eval-every", "-1", "--eval-problems", "2",
             "--eval-samples", "2", "--save-every", "-1", "--device-type", "cpu", "--init-lr-frac", "1.0",
             "--model-tag", "d1"]
    ckpt = os.path.join(base, "chatrl_checkpoints", "d1")
    run(base, flags)
    want = torch.load(model_path(ckpt, 3), weights_only=True)
    run(base, flags + ["--stop-after", "1"])  # a new run (the one above moves aside), "killed" after step 1
    assert complete_steps(ckpt) == [1]
    out = run(base, flags + ["--resume"]).stdout
    assert "resumed from" in out and complete_steps(ckpt) == [1, 3]
    got = torch.load(model_path(ckpt, 3), weights_only=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert os.path.exists(os.path.join(base, "report", "chat-rl.json"))
