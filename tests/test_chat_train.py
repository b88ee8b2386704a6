"""mid_train and chat_sft: conversation packing, SFT batch collation (loss only where the mask is 1),
the logit-based multiple-choice accuracy, and both stages end to end in subprocesses from a tiny
base checkpoint, with exact kill-and-resume. Nothing is downloaded: the mixtures are small JSONL
files (custom:PATH)."""
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import complete_steps, load_checkpoint, model_path, save_checkpoint
from nanochat.report import slugify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4


def run(base, args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def losses(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


_NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo"]
_THINGS = ["cat", "dog", "tree", "sun", "boat", "cup"]


def make_conversations(n, seed=0):
    """Small templated chats, some multi-turn and some with a python tool call."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        kind = i % 3
        if kind == 0:
            msgs = [{"role": "user", "content": f"hi, I am {name}"},
                    {"role": "assistant", "content": f"Hello {name}! How can I help?"},
                    {"role": "user", "content": f"spell {thing}"},
                    {"role": "assistant", "content": "-".join(thing)}]
        elif kind == 1:
            msgs = [{"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                                      {"type": "python", "text": f"{a}+{b}"},
                                                      {"type": "python_output", "text": str(a + b)},
                                                      {"type": "text", "text": f" so {a + b}."}]}]
        else:
            msgs = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Who likes the {thing}?"},
                    {"role": "assistant", "content": f"{name} likes the {thing}."}]
        out.append({"messages": msgs})
    return out


def make_mc(n, seed=0):
    from tasks.common import mc_conversation
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        thing = rng.choice(_THINGS)
        choices = rng.sample(_THINGS, 3)
        if thing not in choices:
            choices[rng.randrange(3)] = thing
        out.append(mc_conversation(f"Which is a {thing}?", choices, choices.index(thing)))
    return out


def write_jsonl(path, conversations):
    with open(path, "w") as f:
        for c in conversations:
            f.write(json.dumps(c) + "\n")
    return str(path)


def make_base(root, tiny_base_dir):
    """A base dir sharing the tiny tokenizer, with a depth-1 base checkpoint d1 (random init, seed 0)
    and the chat/MC JSONL files."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    os.makedirs(root)
    for name in ("base_data", "tokenizer"):
        os.symlink(os.path.join(tiny_base_dir, name), os.path.join(root, name))
    vocab = Tokenizer.byte_level().get_vocab_size()
    config = GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # a not-quite-fresh model: nonzero output projections so every layer gets gradients
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    save_checkpoint(os.path.join(root, "base_checkpoints", "d1"), 10, model.state_dict(), None,
                    {"step": 10, "model_config": dataclasses.asdict(config)})
    write_jsonl(os.path.join(root, "chats.jsonl"), make_conversations(60))
    write_jsonl(os.path.join(root, "mc.jsonl"), make_mc(12))
    return str(root)


MID = ["scripts.mid_train", "--device-batch-size", "2", "--max-seq-len", "64", "--total-batch-size", "256",
       "--num-iterations", "6", "--eval-every", "3", "--eval-tokens", "256", "--val-examples", "6",
       "--device-type", "cpu", "--dtype", "float32", "--compile", "off"]
SFT = ["scripts.chat_sft", "--device-batch-size", "2", "--max-seq-len", "64", "--examples-per-step", "4",
       "--num-iterations", "6", "--eval-every", "3", "--eval-mc-every", "3", "--val-examples", "6",
       "--eval-mc-examples", "8", "--init-lr-frac", "0.5", "--device-type", "cpu", "--dtype", "float32",
       "--compile", "off"]


def custom(base, name="chats.jsonl"):
    return f"custom:{os.path.join(base, name)}"


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    """mid_train then chat_sft, uninterrupted, with periodic checkpoints."""
    base = make_base(tmp_path_factory.mktemp("ct") / "base", tiny_base_dir)
    mid_out = run(base, MID + ["--mixture", custom(base), "--save-every", "3",
                               "--loss-file", os.path.join(base, "mid.jsonl")]).stdout
    sft_out = run(base, SFT + ["--mixture", custom(base), "--eval-mc", custom(base, "mc.jsonl"), "--save-every", "3",
                               "--loss-file", os.path.join(base, "sft.jsonl")]).stdout
    return base, mid_out, sft_out


# ------------------------------------------------------------------------------------------------
# units


def test_collate_targets_only_where_mask_is_one(byte_tokenizer):
    from nanochat.training import collate
    convs = make_conversations(3)
    rendered = [byte_tokenizer.render_conversation(c) for c in convs]
    T, pad = 40, byte_tokenizer.get_bos_token_id()
    x, y = collate(rendered, pad, T=T)
    L = min(T, max(len(ids) for ids, _ in rendered) - 1)
    assert x.shape == y.shape == (3, L)
    for i, (ids, mask) in enumerate(rendered):
        ids, mask = ids[:T + 1], mask[:T + 1]
        n = len(ids) - 1
        assert x[i, :n].tolist() == ids[:-1] and (x[i, n:] == pad).all()
        want = [t if m == 1 else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (L - n)
        assert y[i].tolist() == want
        assert ((y[i] >= 0).sum().item()) == sum(mask[1:])
    # at least one supervised and one unsupervised target per row (user prompts are never targets)
    assert all((row >= 0).any() and (row == -1).any() for row in y)
    # python outputs are never targets
    ids, mask = byte_tokenizer.render_conversation(convs[1])
    out_start = byte_tokenizer.encode_special("<|output_start|>")
    _, y1 = collate([(ids, mask)], pad, T=1000)
    assert out_start in ids and out_start not in y1.tolist()[0]
    # pad_to gives static shapes
    x2, y2 = collate(rendered, pad, T=T, pad_to=T)
    assert x2.shape == (3, T) and torch.equal(y2[:, :L], y)


def test_sft_loss_ignores_unmasked_tokens(byte_tokenizer, tiny_model):
    """Changing prompt tokens' targets can't change the loss: only masked positions count."""
    from nanochat.training import collate
    ids, mask = byte_tokenizer.render_conversation(make_conversations(3)[2])
    x, y = collate([(ids, mask)], byte_tokenizer.get_bos_token_id(), T=63)
    per_tok = tiny_model(x, y, loss_reduction="none")
    assert (per_tok[y == -1] == 0).all() and (per_tok[y >= 0] > 0).all()
    manual = torch.nn.functional.cross_entropy(tiny_model(x)[y >= 0], y[y >= 0])
    torch.testing.assert_close(tiny_model(x, y), manual)


def test_packed_loader_rows_and_resume(byte_tokenizer):
    from nanochat.dataloader import packed_loader, render_stream
    convs = make_conversations(6)

    class L(list):  # a list is enough of a Task for render_stream
        pass

    stream, starts = render_stream(L(convs), byte_tokenizer)
    bos = byte_tokenizer.get_bos_token_id()
    assert starts.sum() == 6 and (stream[starts] == bos).all() and stream[0] == bos
    B, T = 3, 16
    gen = packed_loader(stream, starts, B, T, bos)
    batches = [next(gen) for _ in range(12)]  # more than one epoch
    assert batches[-1][2]["epoch"] >= 1
    for x, y, _ in batches:
        assert x.shape == y.shape == (B, T) and (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
    resumed = packed_loader(stream, starts, B, T, bos, resume_state=batches[3][2])
    for want in batches[4:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    # the first row is the start of the stream; the next continues it (bos restated if mid-conversation)
    row0 = torch.cat([batches[0][0][0], batches[0][1][0, -1:]]).tolist()
    assert row0 == stream[:T + 1].tolist()
    row1 = batches[0][0][1].tolist()  # inputs: T tokens
    if starts[T + 1]:
        assert row1 == stream[T + 1:2 * T + 1].tolist()
    else:
        assert row1 == [bos] + stream[T + 1:2 * T].tolist()


def test_mixture_parsing_and_split(tmp_path):
    from tasks.mixtures import build_tasks, parse_mixture, split_mixture
    assert parse_mixture("chitchat, gsm8k*3,custom:/a/b.jsonl") == [("chitchat", 1), ("gsm8k", 3), ("custom:/a/b.jsonl", 1)]
    with pytest.raises(ValueError, match="unknown mixture entry"):
        parse_mixture("chitchat,nope")
    path = write_jsonl(tmp_path / "c.jsonl", make_conversations(30))
    tasks = build_tasks(f"custom:{path}*2,gsm8k", "mid", max_per_task=10)
    assert [len(t) for t in tasks] == [10, 10, 10]
    train, val = split_mixture(tasks, val_examples=100)
    assert len(val) == 3 and len(train) == 27  # val capped at a tenth
    ids = lambda t: [json.dumps(c, sort_keys=True) for c in t]  # noqa: E731
    assert len(ids(train)) + len(ids(val)) == 30
    # the two stages draw different synthetic problems
    a = build_tasks("gsm8k", "mid", max_per_task=3)[0]
    b = build_tasks("gsm8k", "sft", max_per_task=3)[0]
    assert a[0] != b[0]


def test_step_examples_cover_each_epoch_and_split_ranks():
    from scripts.chat_sft import step_examples
    n, eps = 10, 4
    seen = [i for s in range(5) for i in step_examples(s, eps, n, 0, 1)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    two = [step_examples(3, eps, n, r, 2) for r in range(2)]
    assert two[0] + two[1] == step_examples(3, eps, n, 0, 1)


def test_mc_accuracy_reads_the_letter_logits_at_the_last_prompt_token(byte_tokenizer):
    from scripts.chat_sft import mc_accuracy
    convs = make_mc(10, seed=3)
    a_id, b_id = byte_tokenizer.encode("A")[0], byte_tokenizer.encode("B")[0]
    prompt_lens = []

    class Fake(torch.nn.Module):
        """Prefers A everywhere except at the position right after <|assistant_start|>, where B wins."""

        def forward(self, x):
            logits = torch.zeros(*x.shape, byte_tokenizer.get_vocab_size())
            logits[..., a_id] = 1.0
            start = byte_tokenizer.encode_special("<|assistant_start|>")
            for i in range(x.shape[0]):
                last = (x[i] == start).nonzero()[-1].item()
                prompt_lens.append(last + 1)
                logits[i, last, b_id] = 2.0
            return logits

    from nanochat.training import Run
    acc, n = mc_accuracy(Fake(), byte_tokenizer, convs, 3, 10_000, Run(False, 0, 1, torch.device("cpu")))
    want = sum(c["messages"][-1]["content"] == "B" for c in convs) / len(convs)
    assert n == 10 and acc == pytest.approx(want)
    assert 0 < want < 1  # the test data has both kinds


# ------------------------------------------------------------------------------------------------
# end to end


def test_mid_and_sft_end_to_end(trained):
    base, mid_out, sft_out = trained
    mid_dir = os.path.join(base, "mid_checkpoints", "d1")
    assert complete_steps(mid_dir) == [3, 6]
    _, optim, meta = load_checkpoint(mid_dir, 6, "cpu", load_optimizer=True)
    assert meta["model_config"]["n_layer"] == 1 and meta["mixture"].startswith("custom:")
    assert math.isfinite(meta["val_bpb"]) and len(optim["optimizers"]) == 2
    mid = losses(os.path.join(base, "mid.jsonl"))
    assert [r["step"] for r in mid] == list(range(6)) and mid[-1]["loss"] < mid[0]["loss"]
    assert "val bpb" in mid_out and "tok/s" in mid_out and "eta" in mid_out

    sft_dir = os.path.join(base, "chatsft_checkpoints", "d1")
    assert complete_steps(sft_dir) == [3, 6]
    _, _, meta = load_checkpoint(sft_dir, 6, "cpu")
    assert meta["source"] == "mid" and math.isfinite(meta["val_loss"])
    acc = meta["mc_acc"][custom(base, "mc.jsonl")]
    assert 0 <= acc <= 1
    sft = losses(os.path.join(base, "sft.jsonl"))
    assert [r["step"] for r in sft] == list(range(6)) and all(r["tokens"] > 0 for r in sft)
    assert "val loss" in sft_out and "acc:" in sft_out

    from nanochat.checkpoint_manager import load_model
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        model, tok, _ = load_model("sft", "cpu", "eval")
    finally:
        del os.environ["NANOCHAT_BASE_DIR"]
    assert model.config.n_embd == 64
    for section in ("Midtraining", "Chat SFT"):
        assert os.path.exists(os.path.join(base, "report", slugify(section) + ".md")), section


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_kill_and_resume_matches_uninterrupted(trained, tmp_path, stage):
    base, _, _ = trained
    other = str(tmp_path / "base")
    shutil.copytree(base, other, symlinks=True, ignore=shutil.ignore_patterns("report", "*.jsonl", "*_checkpoints"))
    shutil.copytree(os.path.join(base, "base_checkpoints"), os.path.join(other, "base_checkpoints"))
    if stage == "sft":
        shutil.copytree(os.path.join(base, "mid_checkpoints"), os.path.join(other, "mid_checkpoints"))
    write_jsonl(os.path.join(other, "chats.jsonl"), make_conversations(60))
    write_jsonl(os.path.join(other, "mc.jsonl"), make_mc(12))
    part = os.path.join(other, "part.jsonl")
    if stage == "mid":
        args = MID + ["--mixture", custom(other), "--loss-file", part]
    else:
        args = SFT + ["--mixture", custom(other), "--eval-mc", custom(other, "mc.jsonl"), "--loss-file", part]
    run(other, args + ["--save-every", "3", "--stop-after", "3"])
    out_dir = {"mid": "mid_checkpoints", "sft": "chatsft_checkpoints"}[stage]
    assert complete_steps(os.path.join(other, out_dir, "d1")) == [3]
    run(other, args + ["--resume"])
    got, want = losses(part), losses(os.path.join(base, f"{stage}.jsonl"))
    assert [r["step"] for r in got] == list(range(6))
    for g, w in zip(got, want):
        assert g["lrm"] == w["lrm"]
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), (g, w)
    a = torch.load(model_path(os.path.join(other, out_dir, "d1"), 6), weights_only=True)
    b = torch.load(model_path(os.path.join(base, out_dir, "d1"), 6), weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=1e-6)


def test_two_phase_midtraining_then_sft_loads_the_real_one(tiny_base_dir, tmp_path):
    """A drill phase under its own tag, midtraining from its weights (--source mid), then chat_sft: SFT must
    pick the real midtraining (d1), not the drill, even when the drill's directory is the newer one."""
    from nanochat.report import Report
    base = make_base(tmp_path / "base", tiny_base_dir)
    mid_root = os.path.join(base, "mid_checkpoints")
    run(base, MID + ["--mixture", custom(base), "--num-iterations", "4", "--save-tag", "drill"])
    assert complete_steps(os.path.join(mid_root, "drill")) == [4] and not os.path.exists(os.path.join(mid_root, "d1"))

    second = MID + ["--mixture", custom(base), "--source", "mid", "--model-tag", "drill", "--save-tag", "d1"]
    run(base, second + ["--stop-after", "0"])  # saves the starting weights at step 0
    start = torch.load(model_path(os.path.join(mid_root, "d1"), 0), weights_only=True)
    drill = torch.load(model_path(os.path.join(mid_root, "drill"), 4), weights_only=True)
    assert start.keys() == drill.keys()
    for k in start:
        torch.testing.assert_close(start[k], drill[k], rtol=0, atol=0)
    run(base, second + ["--resume"])  # --resume continues the --save-tag, not the loaded tag
    assert complete_steps(os.path.join(mid_root, "d1")) == [0, 6]
    assert complete_steps(os.path.join(mid_root, "drill")) == [4]  # the drill is untouched

    later = os.path.getmtime(os.path.join(mid_root, "d1")) + 100
    os.utime(os.path.join(mid_root, "drill"), (later, later))
    out = run(base, SFT + ["--mixture", custom(base), "--eval-mc", custom(base, "mc.jsonl")]).stdout
    assert "model (mid d1)" in out
    _, _, meta = load_checkpoint(os.path.join(base, "chatsft_checkpoints", "d1"), 6, "cpu")
    assert meta["source"] == "mid"

    sections = [m["section"] for _, m in Report(os.path.join(base, "report"))._sections()]
    assert sections.index("Midtraining (drill)") + 1 == sections.index("Midtraining") < sections.index("Chat SFT")


def test_second_phase_flags_fail_clearly(tiny_base_dir, tmp_path):
    base = make_base(tmp_path / "base", tiny_base_dir)
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1")

    def fails(args):
        p = subprocess.run([sys.executable, "-m"] + MID + ["--mixture", custom(base)] + args, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        return p.stderr

    assert "invalid choice: 'sft'" in fails(["--source", "sft"])
    err = fails(["--source", "mid", "--model-tag", "nosuch", "--save-tag", "d1"])
    assert "mid_checkpoints/nosuch" in err and "scripts.mid_train" in err
    err = fails(["--save-tag", "nosuch", "--resume"])
    assert "cannot resume" in err and "nosuch" in err
    run(base, MID + ["--mixture", custom(base), "--num-iterations", "1", "--save-tag", "drill"])
    assert "give --save-tag a different tag" in fails(["--source", "mid", "--model-tag", "drill"])
