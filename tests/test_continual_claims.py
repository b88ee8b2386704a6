"""What the continual-learning strategies claim, held on a tiny deterministic two-domain setup: two text
domains with disjoint byte vocabularies, a depth-1 model that saw a little of both, 30 steps per task.
Learning the second domain by plain fine-tuning wrecks the first; each remedy must forget less."""
import dataclasses
import random

import pytest
import torch

from nanochat.continual.loop import ContinualConfig, run_strategy, train_loop
from nanochat.continual.adapters import OLoRA
from nanochat.continual.strategies import Strategy
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from nanochat.training import collate
from tasks.continual import LMTask

SEQ_LEN = 48
pytestmark = pytest.mark.usefixtures("one_thread")


def domain_docs(letters, sep, end, n_docs, seed):
    """Documents of 60 words drawn from a fixed 24-word vocabulary spelled with `letters` only."""
    vocab_rng, rng = random.Random(letters), random.Random(seed)
    vocab = ["".join(vocab_rng.choice(letters) for _ in range(vocab_rng.randint(2, 5))) for _ in range(24)]
    return [sep.join(rng.choice(vocab) for _ in range(60)) + end for _ in range(n_docs)]


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.byte_level()
    a = domain_docs("abcdefghijklm", " ", ".", 24, 0)
    b = domain_docs("nopqrstuvwxyz", "-", "!", 24, 1)
    assert not set("".join(a)) & set("".join(b))  # disjoint vocabularies
    tasks = [LMTask("a", tok, a[:20], a[20:], SEQ_LEN, 48, 12, batch_size=16),
             LMTask("b", tok, b[:20], b[20:], SEQ_LEN, 48, 12, batch_size=16)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    rows = [r for t in tasks for r in t.train_rows[:16]]  # a little of both domains first
    train_loop(model, rows, Strategy(model, tok, ContinualConfig(steps=60, batch_size=8, lr=3e-3, log_every=10**9), []))
    return tok, tasks, model, {k: v.clone() for k, v in model.state_dict().items()}


def config():
    return ContinualConfig(steps=30, batch_size=8, lr=3e-3, lora_lr=3e-2, lora_rank=4, lora_alpha=8, warmup_steps=2,
                           replay_size=32, replay_ratio=0.5, ewc_lambda=1e4, ewc_samples=8, ssr_samples=16,
                           ssr_prompts=2, ssr_prompt_tokens=4, ssr_len=SEQ_LEN + 1, router=False, log_every=10**9)


def test_each_remedy_forgets_less_than_naive(setup):
    tok, tasks, model, init = setup
    forgetting, runs, base = {}, {}, None
    variants = [(s, s, {}) for s in ("naive", "replay", "ewc", "ssr", "lora", "merge", "olora")]
    variants.append(("merge-from-base", "merge", {"merge_stacked": False}))
    for name, strategy, option in variants:
        model.load_state_dict(init)
        r = run_strategy(model, tok, tasks, strategy, dataclasses.replace(config(), **option), base=base)
        base = r["base"]
        forgetting[name], runs[name] = r["matrices"][strategy]["forgetting"], r
    print(forgetting)
    assert forgetting["naive"] > 1.0  # bits per byte: the first domain really is forgotten
    for strategy in ("replay", "ewc", "ssr"):
        assert forgetting[strategy] < 0.5 * forgetting["naive"], (strategy, forgetting)
    assert forgetting["lora"] == 0.0  # one adapter per task, scored with its own adapter
    # merge and olora confine each new adapter off the first domain's layer inputs (the default), which
    # leaves it almost untouched: through a stack (olora), a merge of stacked adapters, or a merge of
    # adapters trained on the bare base (measured: ~1000x below naive)
    for name in ("merge", "olora", "merge-from-base"):
        assert forgetting[name] < 0.05 * forgetting["naive"], (name, forgetting)
        assert runs[name]["added_bytes"] > runs["lora"]["added_bytes"]  # two adapters as lora's, plus the bases
        assert len(runs[name]["subspace_dims"]) == 1  # one basis update: after the first of two tasks


def test_subspace_options_are_checked(setup):
    tok, tasks, model, init = setup
    for strategy, option in (("merge", "merge_subspace"), ("olora", "olora_subspace")):
        with pytest.raises(ValueError, match=f"{option} must be"):
            run_strategy(model, tok, tasks, strategy, dataclasses.replace(config(), **{option: "outputs"}), base=[0, 0])


def test_olora_inputs_keeps_the_new_adapter_off_the_old_inputs(setup):
    """After every optimizer step the new adapter's A reads nothing of the first task's kept input basis,
    and it learned: the second domain's loss falls, the first domain's barely moves."""
    tok, tasks, model, init = setup
    model.load_state_dict(init)
    cfg = dataclasses.replace(config(), subspace_energy=0.99, subspace_own=0.0)  # A anywhere off the basis
    strat = OLoRA(model, tok, cfg, tasks)
    old_rows, new_rows = (collate(t.train_rows[:8], tok.get_bos_token_id(), "cpu") for t in tasks)
    try:
        strat.before_task(0, tasks[0])
        train_loop(model, tasks[0].train_rows, strat, 0, seed=0)
        strat.after_task(0, tasks[0])
        assert strat.penalty() is None
        bases = dict(strat.subspace.bases)
        assert set(bases) == set(strat.lora.modules)
        with torch.no_grad():
            old_before, new_before = model(*old_rows).item(), model(*new_rows).item()
        strat.before_task(1, tasks[1])
        new = strat.lora.adapters[strat.names[1]]
        start = [a.detach().clone() for a in new.A]
        train_loop(model, tasks[1].train_rows, strat, 1, seed=1)
        assert strat.penalty() is None  # "inputs" confines; it adds no loss
        for key, i in new.index.items():
            assert (new.A[i] @ bases[key]).abs().max().item() < 1e-5
            assert (new.A[i] - start[i]).abs().max().item() > 1e-3  # trained, not just projected
        with torch.no_grad():
            old_shift = abs(model(*old_rows).item() - old_before)
            new_gain = new_before - model(*new_rows).item()
        assert new_gain > 0.5 and old_shift < 0.1 * new_gain, (old_shift, new_gain)
    finally:
        strat.close()


def test_olora_freezes_the_earlier_adapters_and_penalises_overlap(setup):
    tok, tasks, model, init = setup
    model.load_state_dict(init)
    strat = OLoRA(model, tok, dataclasses.replace(config(), olora_subspace="adapters"), tasks)
    try:
        strat.before_task(0, tasks[0])
        assert strat.penalty() is None  # nothing to be orthogonal to yet
        strat.before_task(1, tasks[1])
        old, new = (strat.lora.adapters[n] for n in strat.names)
        assert strat.lora.active == strat.names  # the whole stack serves, no task id
        assert not any(p.requires_grad for p in old.parameters()) and all(p.requires_grad for p in new.parameters())
        expected = sum((new.A[i] @ old.A[i].T).pow(2).sum() for i in range(len(new.A))) * strat.cfg.olora_lambda
        value = strat.penalty()()
        assert torch.allclose(value, expected) and value > 0
        value.backward()
        assert all(a.grad is not None for a in new.A) and all(a.grad is None for a in old.A)
        with torch.no_grad():  # a new adapter reading other input directions costs nothing
            for a_new, a_old in zip(new.A, old.A):
                q, _ = torch.linalg.qr(a_old.T)  # (in, r): the old adapter's input subspace
                a_new -= (a_new @ q) @ q.T
        assert strat.penalty()().item() < 1e-8 * value.item()
    finally:
        strat.close()
