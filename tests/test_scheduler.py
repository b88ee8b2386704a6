"""Continuous batching: the ragged KV cache, and a request's tokens in a mixed, changing batch equal its tokens
run alone through Engine.generate (greedy and seeded sampling, tool calls, stops, chunked prefill, cancels,
mixed LoRA adapters), plus logprobs, top_p, penalties, validation and the background thread."""
import random
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import RaggedKVCache
from nanochat.lora.adapter import LoRA
from nanochat.serve.scheduler import Request, Scheduler
from nanochat.tools.search import Searcher, build_index
from nanochat.tokenizer import Tokenizer
from nanochat.tools.registry import ToolRegistry
from tests.conftest import at_positions

TOK = Tokenizer.byte_level()
V = TOK.get_vocab_size()
S = TOK.encode_special
BOS, A_START, A_END = TOK.get_bos_token_id(), S("<|assistant_start|>"), S("<|assistant_end|>")
PY_START, PY_END, OUT_START, OUT_END = S("<|python_start|>"), S("<|python_end|>"), S("<|output_start|>"), S("<|output_end|>")

pytestmark = pytest.mark.usefixtures("one_thread")


def b(ch):
    (t,) = TOK.encode(ch)
    return t


def make_gpt(n_head=4, n_kv_head=2, n_layer=2, n_embd=128, seq=128, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                          n_embd=n_embd))
    with torch.no_grad():  # the zero-initialised projections would make attention irrelevant
        for block in model.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        nn.init.normal_(model.lm_head.weight, std=0.1)
    return model.eval()


class ScriptedGPT(nn.Module):
    """A real GPT (its choices depend on the whole context) whose next token is overridden after the
    tokens in `script`: "=" starts a tool call (the calculator's 6*7 by default), and after the tool's
    forced output it stops."""

    def __init__(self, gpt, call="6*7"):  # the call's characters must be distinct (token -> next token)
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        call = [PY_START] + TOK.encode(call) + [PY_END]
        self.script = {b("="): PY_START, **dict(zip(call, call[1:])), OUT_END: A_END}

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None, logits_at=None):
        logits = self.gpt(idx, kv_cache=kv_cache).clone()
        for a, nxt in self.script.items():
            hit = idx == a
            logits[hit] = -30.0
            logits[..., nxt][hit] = 30.0
        return at_positions(logits, logits_at)


def alone(model, prompt, tools=None, **kw):
    """Engine.generate on one request: [(token, sampled)], the stop token included."""
    engine = Engine(model, TOK, tools=ToolRegistry() if tools is None else tools)  # what a Scheduler runs
    return [(col[0], bool(m[0])) for col, m in engine.generate(prompt, num_samples=1, **kw)]


class Collector:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def tokens(self):
        return [(e.token, e.sampled) for e in self.events if e.token is not None]

    @property
    def finish(self):
        return self.events[-1].finish if self.events else None


def prompts_of(lengths, seed, end="="):
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        p = [BOS] + [rng.randrange(32, 127) for _ in range(n - 2)]
        out.append(p + [b(end) if i % 2 == 0 else b("?")])
    return out


# --- the ragged cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 1)])
def test_ragged_cache_matches_full_forward(n_head, n_kv_head):
    model = make_gpt(n_head=n_head, n_kv_head=n_kv_head)
    seqs = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 30)]
    cache = RaggedKVCache(4, n_kv_head, 32, 2, seq_len=8)  # capacity 8: it must grow
    with torch.no_grad():
        ids = torch.zeros(2, 10, dtype=torch.long)  # slots 0 and 3 together, the first right-padded
        ids[0, :5], ids[1] = torch.tensor(seqs[0]), torch.tensor(seqs[2][:10])
        first = model(ids, kv_cache=cache.rows([0, 3], [5, 10]))
        for i in range(0, 17, 7):  # slot 2 in chunks of 7
            chunk = seqs[1][i:i + 7]
            second = model(torch.tensor([chunk]), kv_cache=cache.rows([2], [len(chunk)]))
        third = model(torch.tensor([seqs[2][10:]]), kv_cache=cache.rows([3], [20]))
        assert cache.lengths == [5, 0, 17, 30]
        full = [model(torch.tensor([s]))[0] for s in seqs]
        torch.testing.assert_close(first[0, :5], full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[0, :3], full[1][14:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(third[0], full[2][10:], atol=1e-5, rtol=1e-5)
        step = model(torch.tensor([[1], [2], [3]]), kv_cache=cache.rows([0, 2, 3], [1, 1, 1]))
        for i, (s, t) in enumerate(zip(seqs, (1, 2, 3))):
            torch.testing.assert_close(step[i, 0], model(torch.tensor([s + [t]]))[0, -1], atol=1e-5, rtol=1e-5)
        cache.reset(2)  # a reused slot starts empty: its old keys are never seen again
        again = model(torch.tensor([seqs[0]]), kv_cache=cache.rows([2], [5]))
        torch.testing.assert_close(again[0], full[0], atol=1e-5, rtol=1e-5)


# --- a request in a batch == the request alone --------------------------------------------------

def run_staggered(sched, requests, join_at):
    """Submit requests[i] before step join_at[i]; step until idle. -> the collectors."""
    out = [Collector() for _ in requests]
    step = 0
    while step <= max(join_at) or sched.pending():
        for i, at in enumerate(join_at):
            if at == step:
                sched.submit(requests[i], out[i])
        sched.step()
        step += 1
    return out


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (4, 1)])
def test_greedy_batch_equals_alone_with_tools_stops_and_chunked_prefill(n_head, n_kv_head):
    model = ScriptedGPT(make_gpt(n_head=n_head, n_kv_head=n_kv_head, seed=n_kv_head))
    prompts = prompts_of([3, 40, 11, 75, 6, 23], seed=n_kv_head)
    max_tokens = [30, 12, 40, 25, 50, 8]
    reqs = [Request(p, max_tokens=m, temperature=0.0) for p, m in zip(prompts, max_tokens)]
    # 16 prefill tokens per step: the 40- and 75-token prompts are chunked and prefilled between decodes
    sched = Scheduler(model, TOK, max_batch=4, prefill_tokens=16)
    got = run_staggered(sched, reqs, join_at=[0, 0, 2, 3, 3, 9])
    tools = stops = 0
    for req, c, m in zip(reqs, got, max_tokens):
        want = alone(model, req.prompt, max_tokens=m, temperature=0.0)
        assert c.tokens == want
        assert c.finish == ("stop" if want[-1][0] == A_END else "length")
        tools += OUT_START in [t for t, _ in want]
        stops += c.finish == "stop"
    assert tools >= 2 and stops >= 2  # the test really covers tool calls and rows leaving early
    assert sched.cache.lengths == [0] * 4 and not sched.rows and sorted(sched._free) == [0, 1, 2, 3]


def test_seeded_sampling_batch_equals_alone():
    model = ScriptedGPT(make_gpt(seed=3))
    prompts = prompts_of([5, 30, 12, 9], seed=1)
    settings = [dict(temperature=1.0, seed=1), dict(temperature=0.7, top_k=5, seed=2),
                dict(temperature=1.2, seed=3), dict(temperature=0.0)]
    reqs = [Request(p, max_tokens=25, **kw) for p, kw in zip(prompts, settings)]
    got = run_staggered(Scheduler(model, TOK, prefill_tokens=24), reqs, join_at=[0, 1, 1, 4])
    for req, c, kw in zip(reqs, got, settings):
        assert c.tokens == alone(model, req.prompt, max_tokens=25, **kw)


def test_cancel_leaves_at_once_and_others_are_unaffected():
    model = make_gpt()
    prompts = prompts_of([6, 9, 14], seed=2, end="?")
    reqs = [Request(p, max_tokens=20, temperature=0.0) for p in prompts]
    sched = Scheduler(model, TOK, max_batch=2)
    out = [Collector() for _ in reqs]
    handles = [sched.submit(r, c) for r, c in zip(reqs, out)]
    for _ in range(3):
        sched.step()
    assert len(out[2].events) == 0  # waiting: only two slots
    handles[0].cancel()
    sched.step()  # request 0 leaves, request 2 takes its slot and is prefilled in the same step
    assert out[0].finish == "cancelled" and out[0].events[-1].token is None
    n0 = len(out[0].events)
    sched.run_until_idle()
    assert len(out[0].events) == n0
    assert out[0].tokens == alone(model, prompts[0], max_tokens=20, temperature=0.0)[:n0 - 1]
    for i in (1, 2):
        assert out[i].tokens == alone(model, prompts[i], max_tokens=20, temperature=0.0)
    waiting = Collector()
    sched.submit(Request(prompts[0], max_tokens=5), waiting).cancel()  # cancelled before it got a slot
    sched.run_until_idle()
    assert [(e.token, e.finish) for e in waiting.events] == [(None, "cancelled")]


def test_context_limit_and_zero_budget():
    model = make_gpt(seq=32)
    sched = Scheduler(model, TOK)
    long, empty = Collector(), Collector()
    prompt = prompts_of([20], seed=3, end="?")[0]
    sched.submit(Request(prompt, temperature=0.0), long)
    sched.submit(Request(prompt, max_tokens=0), empty)
    sched.run_until_idle()
    want = alone(model, prompt, temperature=0.0)
    assert long.tokens == want
    if want[-1][0] != A_END:
        assert len(want) == 12 and long.finish == "length"
    assert [(e.token, e.finish) for e in empty.events] == [(None, "length")]


# --- sampling options ---------------------------------------------------------------------------

def test_logprobs_are_the_models_distribution():
    model = make_gpt()
    prompt = prompts_of([10], seed=4)[0]
    c = Collector()
    sched = Scheduler(model, TOK)
    sched.submit(Request(prompt, max_tokens=6, temperature=0.9, seed=5, logprobs=3), c)
    sched.run_until_idle()
    seq = list(prompt)
    with torch.no_grad():
        for e in c.events:
            lp = F.log_softmax(model(torch.tensor([seq]))[0, -1], dim=-1)
            assert e.logprob == pytest.approx(float(lp[e.token]), abs=1e-4)
            top = lp.topk(3)
            assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
            assert [v for _, v in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            seq.append(e.token)


def test_top_p_small_is_greedy_and_frequency_penalty_breaks_repeats():
    # a model that always prefers "a" (then "b"): top_p 0.01 keeps only the best token
    table = torch.full((V, V), -5.0)
    table[:, b("a")], table[:, b("b")] = 5.0, 4.0

    class Fixed(nn.Module):
        config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)

        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(table, requires_grad=False)
            self.k = nn.Linear(1, 1)

        def forward(self, idx, kv_cache=None, logits_at=None):  # a bigram table; the cache only advances
            if kv_cache is not None:
                kv_cache.positions(idx.size(1), idx.device)
                kv_cache.insert_kv(0, torch.zeros(idx.size(0), 1, idx.size(1), 8), torch.zeros(idx.size(0), 1, idx.size(1), 8))
            return at_positions(self.W[idx], logits_at)

    sched = Scheduler(Fixed(), TOK)
    plain, nucleus, penalized = Collector(), Collector(), Collector()
    sched.submit(Request([BOS], max_tokens=20, temperature=2.0, seed=0), plain)
    sched.submit(Request([BOS], max_tokens=20, temperature=2.0, top_p=0.01, seed=0), nucleus)
    sched.submit(Request([BOS], max_tokens=6, temperature=0.0, frequency_penalty=2.0), penalized)
    sched.run_until_idle()
    assert {t for t, _ in nucleus.tokens} == {b("a")}
    assert {t for t, _ in plain.tokens} != {b("a")}  # at temperature 2 other tokens do come up
    # greedy with a penalty of 2 per use: a (5) > b (4); then b (4) > a (3); then a (3) vs b (2) ...
    assert [t for t, _ in penalized.tokens] == [b("a"), b("b"), b("a"), b("b"), b("a"), b("b")]


@pytest.mark.parametrize("kw,msg", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(logprobs=21), "logprobs"),
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(max_tokens=-1), "max_tokens"),
])
def test_validation(kw, msg):
    sched = Scheduler(make_gpt(n_layer=1, n_embd=64), TOK)
    with pytest.raises(ValueError, match=msg):
        sched.submit(Request([BOS, b("a")], **kw), Collector())
    with pytest.raises(ValueError, match="prompt"):
        sched.submit(Request([], max_tokens=1), Collector())
    with pytest.raises(ValueError, match="LoRA"):
        sched.submit(Request([BOS], adapter=object()), Collector())
    assert not sched.pending()


# --- mixed adapters -----------------------------------------------------------------------------

def make_lora(model):
    lora = LoRA(model)
    for seed, name in enumerate(("a", "b"), start=1):
        ad = lora.add(name, rank=4, alpha=8)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ad.B:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return lora


def test_mixed_adapters_in_one_batch_equal_each_alone():
    model = make_gpt(seed=7)
    lora = make_lora(model)
    prompts = prompts_of([5, 12, 8, 20, 7], seed=7, end="?")
    names = ["a", None, "b", "a", "b"]
    reqs = [Request(p, max_tokens=15, temperature=0.0, adapter=lora.adapters[n] if n else None)
            for p, n in zip(prompts, names)]
    got = run_staggered(Scheduler(model, TOK, lora=lora), reqs, join_at=[0, 0, 0, 2, 5])
    outs = {}
    for p, n, c in zip(prompts, names, got):
        lora.activate(n)
        want = alone(model, p, max_tokens=15, temperature=0.0)
        assert c.tokens == want
        outs.setdefault(tuple(p), set()).add(tuple(want))
    lora.activate(None)
    # the adapters really change the replies (else the test would prove nothing)
    same = prompts[0]
    lora.activate("b")
    with_b = alone(model, same, max_tokens=15, temperature=0.0)
    lora.activate(None)
    assert with_b != got[0].tokens and alone(model, same, max_tokens=15, temperature=0.0) != got[0].tokens


def test_adapter_replaced_mid_request_keeps_serving_the_old_one():
    model = make_gpt(seed=8)
    lora = make_lora(model)
    prompt = prompts_of([9], seed=8, end="?")[0]
    lora.activate("a")
    want_old = alone(model, prompt, max_tokens=12, temperature=0.0)
    lora.activate(None)
    sched = Scheduler(model, TOK, lora=lora)
    old, new = Collector(), Collector()
    sched.submit(Request(prompt, max_tokens=12, temperature=0.0, adapter=lora.adapters["a"]), old)
    sched.step()
    sched.step()
    sched.call(lambda: (lora.remove("a"), lora.add("a", rank=4, alpha=8)))  # a new version, B = 0: the base
    sched.submit(Request(prompt, max_tokens=12, temperature=0.0, adapter=lora.adapters["a"]), new)
    sched.run_until_idle()
    assert old.tokens == want_old
    assert new.tokens == alone(model, prompt, max_tokens=12, temperature=0.0)  # the new (no-op) version


def test_a_lasting_stack_is_served_folded_with_the_same_tokens():
    model = make_gpt(seed=9)
    lora = make_lora(model)
    prompt = prompts_of([7], seed=9, end="?")[0]
    stack = ((lora.adapters["a"], 1.0), (lora.adapters["b"], 0.5))
    lora.activate(["a", "b"], [1.0, 0.5])
    want = alone(model, prompt, max_tokens=12, temperature=0.0)
    lora.activate(None)
    got = run_staggered(Scheduler(model, TOK, lora=lora), [Request(prompt, max_tokens=12, temperature=0.0,
                                                                   adapter=stack)], join_at=[0])
    assert got[0].tokens == want and lora._fold is not None and lora._fold[1] == stack  # decoded from the fold



def poisoned(lora, name, value=float("nan"), seed=3):
    """An adapter whose every value is `value` (what a corrupt file or a diverged job would hold)."""
    ad = lora.add(name, rank=4, alpha=8, seed=seed)
    with torch.no_grad():
        for p in (*ad.A, *ad.B):
            p.fill_(value)
    return ad


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e38])
def test_a_broken_adapter_reaches_no_other_row(value):
    """A NaN (inf, 1e38) adapter in a mixed batch: every other row - the base model's, other adapters', a
    stack's - is bit for bit what it is with a clean adapter in the broken one's place (the same batch, so the
    same matmul shapes: exact equality is fair), while the broken row itself is garbage."""
    model = make_gpt(seed=12)
    lora = make_lora(model)
    a, b_ = lora.adapters["a"], lora.adapters["b"]
    clean = lora.add("clean", rank=4, alpha=8, seed=3)
    with torch.no_grad():
        for p in clean.B:
            p.normal_(std=0.2)
    bad = poisoned(lora, "bad", value)
    x = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(0))
    mix = lambda third: [None, a, third, ((a, 1.0), (b_, 0.5)), b_]
    with torch.no_grad():
        with lora.per_row(mix(clean)):
            want = model(x)
        with lora.per_row(mix(bad)):
            got = model(x)
    assert not torch.equal(got[2], want[2])  # the broken adapter does reach its own row
    for i in (0, 1, 3, 4):
        assert torch.equal(got[i], want[i]), i


def test_a_nan_request_leaves_no_trace_for_the_next_one_in_its_slot():
    """Greedy requests beside a NaN adapter's request get their tokens as alone, and so does a request that
    later takes over its KV-cache slot (the slot's old keys and values lie past the newcomer's length, where
    a mixed batch's mask zeroes their weight: 0 x NaN must not happen there either)."""
    model = make_gpt(seed=13)
    lora = make_lora(model)
    bad = poisoned(lora, "bad")
    prompts = prompts_of([30, 6, 9, 5], seed=13, end="?")
    sched = Scheduler(model, TOK, lora=lora, max_batch=3)
    reqs = [Request(prompts[0], max_tokens=6, temperature=0.0, adapter=bad),
            Request(prompts[1], max_tokens=40, temperature=0.0),
            Request(prompts[2], max_tokens=12, temperature=0.0, adapter=lora.adapters["a"]),
            Request(prompts[3], max_tokens=10, temperature=0.0)]  # joins once the NaN request has left
    got = run_staggered(sched, reqs, join_at=[0, 0, 0, 12])
    assert got[3].events[0].token is not None and sched.steps > 12
    for i, name in ((1, None), (2, "a"), (3, None)):
        lora.activate(name)
        assert got[i].tokens == alone(model, prompts[i], max_tokens=reqs[i].max_tokens, temperature=0.0), i
    lora.activate(None)


@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 7e-46, 1e-45, 1e-40])
def test_top_p_below_float32s_range_samples_the_best_token(top_p):
    """top_p is compared with float32 probabilities: one that rounds to 0 there must still keep the most
    likely token (what any top_p smaller than its probability keeps), not drop every token."""
    model = make_gpt(seed=14)
    prompt = prompts_of([7], seed=14, end="?")[0]
    c = Collector()
    sched = Scheduler(model, TOK)
    sched.submit(Request(prompt, max_tokens=8, temperature=1.0, top_p=top_p, seed=1), c)
    sched.run_until_idle()
    assert c.finish == "length" and c.tokens == alone(model, prompt, max_tokens=8, temperature=0.0)[:8]

# --- the background thread ----------------------------------------------------------------------

def test_background_thread_serves_concurrent_submitters():
    model = make_gpt()
    prompts = prompts_of([4, 9, 13, 6], seed=9, end="?")
    sched = Scheduler(model, TOK, max_batch=3)
    sched.start()
    try:
        done = [threading.Event() for _ in prompts]
        out = []
        for p, ev in zip(prompts, done):
            c = Collector()
            out.append(c)
            sched.submit(Request(p, max_tokens=10, temperature=0.0),
                         lambda e, c=c, ev=ev: (c(e), e.finish and ev.set()))
        assert all(ev.wait(60) for ev in done)
        assert sched.call(lambda: sched.active()).result(10) == 0
        for p, c in zip(prompts, out):
            assert c.tokens == alone(model, p, max_tokens=10, temperature=0.0)
        hung = Collector()
        sched.submit(Request(prompts[0], max_tokens=10 ** 6, temperature=0.0), hung)
    finally:
        sched.stop()
    assert hung.finish in ("cancelled", "length")


def test_a_failing_row_ends_with_error_and_the_batch_goes_on():
    model = make_gpt()
    prompts = prompts_of([5, 8], seed=10, end="?")
    sched = Scheduler(model, TOK)
    advance, bad = sched.engine.advance, [None]

    def flaky(row, tok):  # stands in for a tool that blows up on what one request's model wrote
        if row is bad[0]:
            raise RuntimeError("tool exploded")
        advance(row, tok)

    sched.engine.advance = flaky
    ok, broken = Collector(), Collector()
    sched.submit(Request(prompts[0], max_tokens=10, temperature=0.0), ok)
    sched.submit(Request(prompts[1], max_tokens=10, temperature=0.0), broken)
    sched.step()  # both prefilled; no failure yet
    bad[0] = sched.rows[1].state
    sched.run_until_idle()
    assert broken.finish == "error" and "tool exploded" in broken.events[-1].error
    assert ok.tokens == alone(model, prompts[0], max_tokens=10, temperature=0.0)


def test_lora_per_row_forward_equals_each_adapter_active():
    model = make_gpt(seed=11)
    lora = make_lora(model)
    x = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = []
        for i, name in enumerate(("a", None, "b")):
            lora.activate(name)
            want.append(model(x[i:i + 1])[0])
        lora.activate("b")  # per-row mode ignores the active adapter
        with lora.per_row([lora.adapters["a"], None, lora.adapters["b"]]):
            got = model(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        lora.merge()
        with pytest.raises(RuntimeError, match="unmerge"):
            with lora.per_row([None, None, None]):
                pass


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-7])
def test_tiny_temperatures_are_greedy(temperature):
    # logits / 1e-300 overflow float32 to inf and softmax gives NaN: tiny temperatures must mean greedy,
    # in the scheduler (with and without penalties) as in Engine.generate
    model = make_gpt()
    prompt = prompts_of([9], seed=3)[0]
    greedy = alone(model, prompt, max_tokens=12, temperature=0.0)
    assert alone(model, prompt, max_tokens=12, temperature=temperature) == greedy
    sched = Scheduler(model, TOK)
    plain, penalized, reference = Collector(), Collector(), Collector()
    sched.submit(Request(prompt, max_tokens=12, temperature=temperature, seed=1), plain)
    sched.submit(Request(prompt, max_tokens=12, temperature=temperature, frequency_penalty=0.5, seed=1), penalized)
    sched.submit(Request(prompt, max_tokens=12, temperature=0.0, frequency_penalty=0.5), reference)
    sched.run_until_idle()
    assert plain.tokens == greedy and plain.finish in ("stop", "length")
    assert penalized.tokens == reference.tokens and penalized.finish in ("stop", "length")


@pytest.mark.parametrize("tool", ["python", "search"])
def test_python_and_search_calls_in_a_batch_equal_each_alone(tool, tmp_path):
    # calls dispatch through nanochat.tools.registry as in Engine.generate; python/search run off the scheduler's
    # thread while the other rows go on decoding
    if tool == "python":
        tools, call = ToolRegistry(), "python:x*7"
        earlier = [PY_START] + TOK.encode("python:\nx = 6") + [PY_END, OUT_START, OUT_END]  # an earlier turn's cell
    else:
        build_index([("a", "Volk is a river. It ends in the Tarsk sea.")], str(tmp_path / "i.sqlite"))
        tools, call, earlier = ToolRegistry(python=False, searcher=Searcher(str(tmp_path / "i.sqlite"), k=1)), "search:Volk", []
    model = ScriptedGPT(make_gpt(seed=6), call=call)
    prompts = prompts_of([4, 20, 9, 31], seed=6)  # the "=" ones (0 and 2) call the tool at once
    prompts[2] = prompts[2][:1] + earlier + prompts[2][1:]
    reqs = [Request(p, max_tokens=80, temperature=0.0) for p in prompts]
    got = run_staggered(Scheduler(model, TOK, max_batch=3, prefill_tokens=16, tools=tools), reqs, join_at=[0, 0, 1, 2])
    outputs = []
    for req, c in zip(reqs, got):
        want = alone(model, req.prompt, tools=tools, max_tokens=80, temperature=0.0)
        assert c.tokens == want and c.finish in ("stop", "length")
        toks = [t for t, _ in want]
        if OUT_START in toks:
            outputs.append(TOK.decode(toks[toks.index(OUT_START) + 1:toks.index(OUT_END)]))
    if tool == "python":  # the row whose prompt set x reads 42; the other one's REPL starts empty
        assert len(outputs) == 2 and "NameError" in outputs[0] and outputs[1] == "42"
    else:
        assert outputs == ["[1] Volk is a river. It ends in the Tarsk sea."] * 2


def test_a_slow_tool_call_does_not_stall_the_batch():
    gate = threading.Event()

    def slow_search(query):  # stands in for a python cell that runs for a while
        gate.wait(30)
        return "found"

    model = ScriptedGPT(make_gpt(seed=7), call="search:q")
    prompts = prompts_of([5, 6], seed=7)  # the first ends with "=" and calls at once; the second does not
    sched = Scheduler(model, TOK, tools=ToolRegistry(python=False, searcher=slow_search))
    caller, other = Collector(), Collector()
    sched.submit(Request(prompts[0], max_tokens=30, temperature=0.0), caller)
    sched.submit(Request(prompts[1], max_tokens=30, temperature=0.0), other)
    for _ in range(100):
        if other.finish is not None:
            break
        sched.step()
    assert other.finish is not None and caller.finish is None  # the other row went on while the call ran
    assert [t for t, _ in caller.tokens][-1] == PY_END  # the caller sits out right after its call
    gate.set()
    sched.run_until_idle()
    fast = ToolRegistry(python=False, searcher=lambda query: "found")
    assert caller.tokens == alone(model, prompts[0], tools=fast, max_tokens=30, temperature=0.0)
    assert other.tokens == alone(model, prompts[1], tools=fast, max_tokens=30, temperature=0.0)
