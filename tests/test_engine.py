"""Engine: KV-cache sampling vs naive recompute, batching, seeding, stopping, tool use, streaming decode,
validation, and the chat CLI's turn/loop logic (no checkpoint needed)."""
import copy
import functools
import io
import random

import pytest
import torch
import torch.nn as nn

from nanochat.tools.calculator import use_calculator
from nanochat.engine import Engine, StreamDecoder
from nanochat.tools.registry import ToolRegistry
from nanochat.fastlinear import pack_linears, packing_supported
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.tokenizer import Tokenizer
from scripts.chat_cli import ContextFullError, chat_loop, chat_turn
from tests.conftest import at_positions

TOK = Tokenizer.byte_level()
V = TOK.get_vocab_size()  # 265
S = TOK.encode_special
BOS, A_START, A_END = TOK.get_bos_token_id(), S("<|assistant_start|>"), S("<|assistant_end|>")
PY_START, PY_END, OUT_START, OUT_END = S("<|python_start|>"), S("<|python_end|>"), S("<|output_start|>"), S("<|output_end|>")
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
NEEDS_PACKING = pytest.mark.skipif(not packing_supported("cpu")[0], reason=packing_supported("cpu")[1])


def b(ch):
    """The byte-level token of a one-byte character."""
    (t,) = TOK.encode(ch)
    return t


def make_gpt(n_head=4, n_kv_head=4, n_layer=2, n_embd=128, seq=128, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                          n_embd=n_embd))
    with torch.no_grad():  # zero-init projections would make attention irrelevant; give them real values
        for block in model.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        nn.init.normal_(model.lm_head.weight, std=0.1)
    return model.eval()


class BigramModel(nn.Module):
    """A fake model whose next-token logits depend only on the last input token: table[t] = the token
    (or list of equally likely tokens) that follows t; anything else is followed by `default`.
    Records the shape of every input so tests can check how the engine batches."""

    def __init__(self, table, default=A_END, seq_len=128):
        super().__init__()
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        W = torch.full((V, V), -20.0)
        for a in range(V):
            nxt = table.get(a, default)
            W[a, nxt if isinstance(nxt, list) else [nxt]] = 20.0
        self.W = nn.Parameter(W, requires_grad=False)
        self.calls = []

    def forward(self, idx, kv_cache=None, logits_at=None):
        self.calls.append(tuple(idx.shape))
        return at_positions(self.W[idx], logits_at)


class ScriptedGPT(nn.Module):
    """A real GPT whose output is overridden after the tokens in `script` (token -> next token), so it
    calls the calculator; everything else is the GPT's own choice (and depends on the whole context)."""

    def __init__(self, gpt, script, suppress=()):
        super().__init__()
        self.gpt, self.script, self.config = gpt, script, gpt.config
        self.suppress = list(suppress)  # tokens never produced on the model's own

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None, logits_at=None):
        logits = self.gpt(idx, kv_cache=kv_cache).clone()
        logits[..., self.suppress] = -30.0
        for a, nxt in self.script.items():
            hit = idx == a
            logits[hit] = -30.0
            logits[..., nxt][hit] = 30.0
        return at_positions(logits, logits_at)


@torch.no_grad()
def naive_generate(model, prompt, max_tokens):
    """Reference: full recompute of the whole sequence every step, greedy, same stop + tool rules.
    Returns (tokens, masks), the stop token included."""
    seq, out, masks, forced, expr, in_py = list(prompt), [], [], [], [], False
    while len(out) < max_tokens and len(seq) < model.config.sequence_len:
        logits = model(torch.tensor([seq]))[0, -1]
        tok, m = (forced.pop(0), 0) if forced else (int(logits.argmax()), 1)
        out.append(tok)
        masks.append(m)
        seq.append(tok)
        if tok in (A_END, BOS):
            break
        if tok == PY_START:
            in_py, expr = True, []
        elif tok == PY_END and in_py:
            in_py = False
            res = use_calculator(TOK.decode(expr))
            if res is not None:
                forced = [OUT_START] + TOK.encode(res) + [OUT_END]
        elif in_py:
            expr.append(tok)
    return out, masks


def stream(engine, prompt, **kw):
    """Every column/mask yielded by generate, as lists of rows."""
    cols = list(engine.generate(prompt, **kw))
    n = len(cols[0][0]) if cols else kw.get("num_samples", 1)
    return [[c[i] for c, _ in cols] for i in range(n)], [[m[i] for _, m in cols] for i in range(n)]


# --- greedy equivalence -------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
def test_greedy_matches_naive_recompute(n_head, n_kv_head):
    model = make_gpt(n_head=n_head, n_kv_head=n_kv_head, seed=n_kv_head)
    engine = Engine(model, TOK, tools=ToolRegistry())
    rng = random.Random(n_kv_head)
    for _ in range(3):
        prompt = [BOS] + [rng.randrange(256) for _ in range(rng.randint(0, 40))]
        ref, ref_masks = naive_generate(model, prompt, 30)
        rows, masks = stream(engine, prompt, max_tokens=30, temperature=0.0)
        assert rows[0] == ref and masks[0] == ref_masks
        assert len(ref) == 30 or ref[-1] in (A_END, BOS)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_compiled_decode_path_matches_eager(monkeypatch, num_samples):
    """compile=True decodes on a StaticKVCache (whole capacity under a mask); torch.compile itself is replaced
    by the identity here so the test stays fast: the tokens must be exactly the eager path's."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    model = make_gpt(n_head=4, n_kv_head=2, seed=3)
    eager, static = Engine(model, TOK, tools=ToolRegistry()), Engine(model, TOK, compile=True)
    rng = random.Random(3)
    for _ in range(3):
        prompt = [BOS] + [rng.randrange(256) for _ in range(rng.randint(1, 30))]
        kw = dict(num_samples=num_samples, max_tokens=25, temperature=0.0)
        assert stream(static, prompt, **kw) == stream(eager, prompt, **kw)


TEXT = "the quick brown fox jumps over the lazy dog. " * 4


def trained_tiny_gpt():
    """A depth-1 model trained for a few seconds on one repeated sentence: its greedy continuations are
    confident, as a real model's mostly are (an untrained model's near-tied logits would flip on any noise).
    Trained once per session; each caller gets its own copy."""
    return copy.deepcopy(_trained_tiny_gpt())


@functools.lru_cache(maxsize=1)
def _trained_tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor(TOK.encode(TEXT))
    for step in range(40):
        starts = torch.randint(0, len(ids) - 49, (8,))
        batch = torch.stack([ids[s:s + 49] for s in starts])
        model(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def to_bf16(model, packed):
    """A bf16 copy of model: plain (model.to(torch.bfloat16)) or with oneDNN-packed Linears (nanochat.fastlinear)."""
    return pack_linears(copy.deepcopy(model)) if packed else copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=NEEDS_PACKING)])
def test_bf16_weights_give_the_same_greedy_tokens(packed):
    """Inference in bf16 weights (half the bytes a decode step reads; plain or packed for oneDNN) against fp32:
    the same greedy tokens at >= 99% of positions over a fixed prompt set."""
    model = trained_tiny_gpt()
    fp32 = Engine(model, TOK, tools=ToolRegistry())
    bf16 = Engine(to_bf16(model, packed), TOK, tools=ToolRegistry())
    same = total = 0
    for start in range(0, 44, 4):
        prompt = [BOS] + TOK.encode(TEXT[start:start + 12])
        a, _ = fp32.generate_batch(prompt, max_tokens=12, temperature=0.0)
        b_, _ = bf16.generate_batch(prompt, max_tokens=12, temperature=0.0)
        assert len(a[0]) == 12  # the text has no stop tokens: every row runs to max_tokens
        same += sum(x == y for x, y in zip(a[0], b_[0]))
        total += 12
    assert same / total >= 0.99, f"{same}/{total}"
    assert TOK.decode(a[0]).startswith(TEXT[start + 12:start + 20])  # and the model did learn the text


@NEEDS_PACKING
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
def test_packed_kv_cache_matches_full_forward(n_head, n_kv_head):
    """Packed bf16 Linears: logits decoded through the KV cache (a prefill, then one token per forward) equal
    the full forward's within bf16 rounding (a misplaced cache entry moves them by O(1)). An untrained model's
    near-tied logits may still flip a greedy token, as plain bf16's do: tokens are checked on the trained model
    (test_packed_greedy_matches_naive_recompute)."""
    model = pack_linears(make_gpt(n_head=n_head, n_kv_head=n_kv_head, seed=n_kv_head))
    c = model.config
    seq = torch.tensor([[BOS] + [random.Random(n_kv_head).randrange(256) for _ in range(47)]])
    with torch.no_grad():
        full = model(seq)[0]
        cache = KVCache(1, c.n_kv_head, 64, c.n_embd // c.n_head, c.n_layer)
        steps = [model(seq[:, :20], kv_cache=cache)[0]] + [model(seq[:, t:t + 1], kv_cache=cache)[0] for t in range(20, 48)]
    assert (torch.cat(steps) - full).abs().max() < 0.1  # logits span about +-5 here


@NEEDS_PACKING
def test_packed_greedy_matches_naive_recompute():
    """Packed bf16 Linears, a trained (confident) model: KV-cache greedy == naive recompute, every token."""
    trained = pack_linears(trained_tiny_gpt())
    engine = Engine(trained, TOK, tools=ToolRegistry())
    for start in range(0, 44, 8):
        prompt = [BOS] + TOK.encode(TEXT[start:start + 12])
        ref, ref_masks = naive_generate(trained, prompt, 12)
        rows, masks = stream(engine, prompt, max_tokens=12, temperature=0.0)
        assert rows[0] == ref and masks[0] == ref_masks


def test_greedy_runs_to_the_context_limit():
    # no stop tokens, so the row must run until the context is full
    model = ScriptedGPT(make_gpt(n_head=4, n_kv_head=2, seq=64), {}, suppress=[A_END, BOS])
    engine = Engine(model, TOK, tools=ToolRegistry())
    prompt = [BOS] + TOK.encode("hello there")
    rows, _ = stream(engine, prompt, temperature=0.0)  # max_tokens None
    ref, _ = naive_generate(model, prompt, 10**6)
    assert len(prompt) + len(rows[0]) == 64
    assert rows[0] == ref


# --- batching and sampling ----------------------------------------------------------------------

def test_batch_greedy_rows_identical_and_prefill_once():
    model = BigramModel({b("a"): b("b"), b("b"): b("c"), b("c"): b("a")}, seq_len=64)
    engine = Engine(model, TOK, tools=ToolRegistry())
    prompt = [BOS] + TOK.encode("xya")
    rows, masks = stream(engine, prompt, num_samples=3, max_tokens=7, temperature=0.0)
    assert rows[0] == rows[1] == rows[2] == TOK.encode("bcabcab")
    assert all(m == [1] * 7 for m in masks)
    # one batch-1 prefill of the whole prompt, then (3, 1) decode steps; no forward after the last token
    assert model.calls == [(1, len(prompt))] + [(3, 1)] * 6


def test_batch_greedy_real_model_rows_identical():
    model = make_gpt(n_head=4, n_kv_head=1)
    engine = Engine(model, TOK, tools=ToolRegistry())
    prompt = [BOS] + TOK.encode("The cat")
    results, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=0.0)
    single, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=20, temperature=0.0)
    assert all(r == single[0] for r in results)


def test_sampling_is_seeded_and_rows_differ():
    model = make_gpt(n_head=4, n_kv_head=2)
    engine = Engine(model, TOK, tools=ToolRegistry())
    prompt = [BOS] + TOK.encode("Once upon")
    kw = dict(num_samples=4, max_tokens=20, temperature=1.0)
    r1, _ = stream(engine, prompt, seed=7, **kw)
    r2, _ = stream(engine, prompt, seed=7, **kw)
    r3, _ = stream(engine, prompt, seed=8, **kw)
    assert r1 == r2
    assert r1 != r3
    assert len({tuple(r) for r in r1}) > 1


def test_top_k_1_is_greedy():
    model = make_gpt(n_head=4, n_kv_head=2)
    engine = Engine(model, TOK, tools=ToolRegistry())
    prompt = [BOS] + TOK.encode("abc")
    greedy, _ = engine.generate_batch(prompt, max_tokens=15, temperature=0.0)
    topk1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=15, temperature=1.5, top_k=1)
    assert topk1 == [greedy[0], greedy[0]]


def test_top_k_restricts_choices():
    # after 'a' four tokens are likely and the rest nearly impossible; top_k=2 keeps two of the four
    table = {b("a"): [b("p"), b("q"), b("r"), b("s")]}
    model = BigramModel(table, default=b("a"))
    model.W.data[b("a"), b("p")] = 21.0
    model.W.data[b("a"), b("q")] = 20.5
    engine = Engine(model, TOK, tools=ToolRegistry())
    rows, _ = stream(engine, [BOS, b("a")], num_samples=64, max_tokens=1, temperature=2.0, top_k=2)
    assert {r[0] for r in rows} == {b("p"), b("q")}


# --- stopping -----------------------------------------------------------------------------------

def test_stop_token_ends_row_and_generate_batch_excludes_it():
    model = BigramModel({A_START: b("h"), b("h"): b("i"), b("i"): A_END})
    engine = Engine(model, TOK, tools=ToolRegistry())
    rows, masks = stream(engine, [BOS, A_START], max_tokens=50, temperature=0.0)
    assert rows == [[b("h"), b("i"), A_END]] and masks == [[1, 1, 1]]
    results, rmasks = engine.generate_batch([BOS, A_START], max_tokens=50, temperature=0.0)
    assert results == [[b("h"), b("i")]] and rmasks == [[1, 1]]


def test_bos_also_stops():
    model = BigramModel({A_START: b("h"), b("h"): BOS})
    results, _ = Engine(model, TOK, tools=ToolRegistry()).generate_batch([BOS, A_START], max_tokens=50, temperature=0.0)
    assert results == [[b("h")]]


def test_rows_stop_independently_with_padding():
    # after 'x' the row stops or continues with equal odds, so rows finish at different steps
    model = BigramModel({b("x"): [b("x"), A_END]}, default=b("x"))
    engine = Engine(model, TOK, tools=ToolRegistry())
    rows, masks = stream(engine, [BOS, b("x")], num_samples=8, max_tokens=40, temperature=1.0, seed=3)
    stops = [r.index(A_END) if A_END in r else None for r in rows]
    assert len(set(stops)) > 1 and all(s is not None for s in stops)
    n_steps = len(rows[0])
    assert n_steps == max(stops) + 1  # generation ends as soon as the last row finishes
    for r, m, s in zip(rows, masks, stops):
        assert r[:s] == [b("x")] * s and m[:s + 1] == [1] * (s + 1)
        assert r[s:] == [A_END] * (n_steps - s) and m[s + 1:] == [0] * (n_steps - s - 1)  # padding
    results, _ = engine.generate_batch([BOS, b("x")], num_samples=8, max_tokens=40, temperature=1.0, seed=3)
    assert [len(r) for r in results] == stops


def test_max_tokens_respected():
    model = BigramModel({}, default=b("z"))
    engine = Engine(model, TOK, tools=ToolRegistry())
    for n in (0, 1, 5):
        rows, _ = stream(engine, [BOS], num_samples=2, max_tokens=n, temperature=0.0)
        assert [len(r) for r in rows] == [n, n]
    results, _ = engine.generate_batch([BOS], num_samples=2, max_tokens=5, temperature=1.0)
    assert results == [[b("z")] * 5] * 2
    # without max_tokens: until the context (128) is full
    results, _ = engine.generate_batch([BOS] * 100, max_tokens=None, temperature=0.0)
    assert len(results[0]) == 28


# --- tool use -----------------------------------------------------------------------------------

def calculator_script(expr, after):
    """assistant_start -> python_start expr python_end; output_end -> `after` tokens; then assistant_end."""
    ids = [PY_START] + TOK.encode(expr) + [PY_END]
    table = {A_START: ids[0]}
    for x, y in zip(ids, ids[1:]):
        table[x] = y
    seq = [OUT_END] + TOK.encode(after) + [A_END]
    for x, y in zip(seq, seq[1:]):
        table[x] = y
    table[PY_END] = b("!")  # what the model "wants" after the call: overridden when a result is forced
    table[b("!")] = A_END
    return table


def test_tool_use_forces_calculator_output():
    model = BigramModel(calculator_script("2+3", "ok"))
    engine = Engine(model, TOK, tools=ToolRegistry())
    rows, masks = stream(engine, [BOS, A_START], num_samples=2, max_tokens=50, temperature=0.0)
    expected = [PY_START, b("2"), b("+"), b("3"), PY_END, OUT_START, b("5"), OUT_END, b("o"), b("k"), A_END]
    assert rows == [expected, expected]
    assert masks[0] == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    results, rmasks = engine.generate_batch([BOS, A_START], max_tokens=50, temperature=0.0)
    assert results == [expected[:-1]] and rmasks == [masks[0][:-1]]


def test_tool_use_non_calculator_expression_forces_nothing():
    model = BigramModel(calculator_script("x", "ok"))
    rows, masks = stream(Engine(model, TOK, tools=ToolRegistry()), [BOS, A_START], max_tokens=50, temperature=0.0)
    assert rows == [[PY_START, b("x"), PY_END, b("!"), A_END]]
    assert masks == [[1] * 5]


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (4, 1)])
def test_forced_tokens_go_through_the_model(n_head, n_kv_head):
    # a real GPT rigged to call the calculator; what it writes afterwards depends on the forced tokens
    # being in its KV cache, so it must match a full recompute of the same sequence
    ids = [PY_START] + TOK.encode("7*6") + [PY_END]
    script = {A_START: PY_START, **{x: y for x, y in zip(ids, ids[1:])}}
    # no stops (and no further tool calls) so the test sees a long continuation
    model = ScriptedGPT(make_gpt(n_head=n_head, n_kv_head=n_kv_head, seed=5), script, suppress=[A_END, BOS, PY_START])
    prompt = [BOS] + TOK.encode("What is 7*6?") + [A_START]
    ref, ref_masks = naive_generate(model, prompt, 30)
    rows, masks = stream(Engine(model, TOK, tools=ToolRegistry()), prompt, max_tokens=30, temperature=0.0)
    assert ref[:9] == ids + [OUT_START, b("4"), b("2"), OUT_END]
    assert ref_masks == [1] * 5 + [0] * 4 + [1] * 21
    assert rows[0] == ref and masks[0] == ref_masks


# --- streaming decode ---------------------------------------------------------------------------

def test_stream_decoder_multibyte():
    text = "héllo wörld — 你好 🎉 ok"
    ids = TOK.encode(text)
    assert len(ids) > len(text)  # multibyte characters really are split across byte tokens
    dec = StreamDecoder(TOK)
    pieces = [dec.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    # a character appears exactly when its last byte arrives
    dec = StreamDecoder(TOK)
    e_bytes = TOK.encode("é")
    assert [dec.push(t) for t in e_bytes] == ["", "é"]


def test_stream_decoder_matches_decode_on_specials_and_bad_bytes():
    ids = [BOS] + TOK.encode("a") + [0xFF] + TOK.encode("b€")[:-1] + [A_END] + TOK.encode("c") + [0xE2]
    dec = StreamDecoder(TOK)
    assert "".join(dec.push(t) for t in ids) + dec.flush() == TOK.decode(ids)
    dec = StreamDecoder(TOK)
    assert dec.push(PY_START) == "<|python_start|>"


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(tokens=[]), "empty"),
    (dict(tokens=[BOS] * 64), "context"),
    (dict(tokens=[BOS] * 100), "context"),
    (dict(tokens=[BOS, 9999]), "vocabulary"),
    (dict(tokens=[BOS, -1]), "vocabulary"),
    (dict(tokens="hello"), "list of token ids"),
    (dict(tokens=[BOS, 1.5]), "integer"),
    (dict(tokens=[BOS], num_samples=0), "num_samples"),
    (dict(tokens=[BOS], num_samples=-2), "num_samples"),
    (dict(tokens=[BOS], temperature=-0.1), "temperature"),
    (dict(tokens=[BOS], temperature=float("nan")), "temperature"),
    (dict(tokens=[BOS], top_k=-1), "top_k"),
    (dict(tokens=[BOS], max_tokens=-1), "max_tokens"),
])
def test_validation(kw, msg):
    engine = Engine(BigramModel({}, seq_len=64), TOK, tools=ToolRegistry())
    with pytest.raises(ValueError, match=msg):
        engine.generate(**kw)  # raised at the call, before iterating
    with pytest.raises(ValueError, match=msg):
        engine.generate_batch(**kw)


def test_accepts_tensor_prompt_and_longest_prompt():
    engine = Engine(BigramModel({}, default=b("z"), seq_len=64), TOK)
    results, _ = engine.generate_batch(torch.tensor([BOS] * 63), temperature=0.0)
    assert results == [[b("z")]]


# --- chat CLI (no checkpoint needed) ------------------------------------------------------------

def chat_model():
    # reply "hi " -> calculator 2+3 -> forced 5 -> "ok" -> end
    ids = TOK.encode("hi ") + [PY_START] + TOK.encode("2+3") + [PY_END]
    table = {A_START: ids[0], **{x: y for x, y in zip(ids, ids[1:])}}
    table.update({PY_END: b("!"), OUT_END: b("o"), b("o"): b("k"), b("k"): A_END})
    return BigramModel(table, seq_len=128)


def test_chat_cli_numerics(monkeypatch):
    """--dtype bfloat16 on CPU packs the Linears (pack_linears says why if it can't); auto packs them where the
    CPU has native bf16; float32 doesn't; CUDA uses autocast."""
    import nanochat.common
    import scripts.chat_cli as cli
    monkeypatch.delenv("NANOCHAT_DTYPE")
    monkeypatch.setattr(nanochat.common, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(cli, "packing_supported", lambda device: (True, ""))
    assert cli.inference_numerics("auto", "cpu") == ("float32", True)
    monkeypatch.setattr(cli, "packing_supported", lambda device: (False, "no native bf16"))
    assert cli.inference_numerics("auto", "cpu") == ("float32", False)
    assert cli.inference_numerics("float32", "cpu") == ("float32", False)
    assert cli.inference_numerics("bfloat16", "cpu") == ("float32", True)
    assert cli.inference_numerics("float32", "cuda") == ("float32", False)
    assert cli.inference_numerics("bfloat16", "cuda") == ("bfloat16", False)
    assert cli.inference_numerics("auto", "mps") == ("float32", False)


def test_chat_turn_streams_and_shows_tool_calls():
    engine = Engine(chat_model(), TOK, tools=ToolRegistry())
    conversation = [{"role": "user", "content": "add"}]
    out = io.StringIO()
    reply = chat_turn(engine, TOK, conversation, temperature=0.0, out=out)
    assert out.getvalue() == "hi [calculator: 2+3 → 5]ok\n"
    assert reply == [{"type": "text", "text": "hi "}, {"type": "python", "text": "2+3"},
                     {"type": "python_output", "text": "5"}, {"type": "text", "text": "ok"}]
    # the reply re-renders to exactly the tokens the engine produced
    full = conversation + [{"role": "assistant", "content": reply}]
    ids, _ = TOK.render_conversation(full)
    prompt = TOK.render_for_completion(conversation)
    generated, _ = engine.generate_batch(prompt, temperature=0.0)
    assert ids == prompt + generated[0] + [A_END]


def test_chat_turn_failed_tool_call_and_limits():
    ids = [PY_START] + TOK.encode("fob") + [PY_END]
    table = {A_START: ids[0], **{x: y for x, y in zip(ids, ids[1:])}}
    table.update({PY_END: b("a")})
    engine = Engine(BigramModel(table, default=b("a"), seq_len=128), TOK)
    out = io.StringIO()
    reply = chat_turn(engine, TOK, [{"role": "user", "content": "q"}], temperature=0.0, max_tokens=10, out=out)
    assert out.getvalue() == "[calculator: fob → no result]aaaaa\n[stopped: reached --max-tokens 10]\n"
    assert reply == [{"type": "python", "text": "fob"}, {"type": "text", "text": "aaaaa"}]
    with pytest.raises(ContextFullError):
        chat_turn(engine, TOK, [{"role": "user", "content": "x" * 200}], out=io.StringIO())


def test_chat_loop_history_clear_and_errors():
    model = chat_model()
    engine = Engine(model, TOK, tools=ToolRegistry())
    lines = iter(["", "   ", "hello", "x" * 300, "again", "clear", "hi", "exit", "never read"])
    out = io.StringIO()
    prompts = []
    orig = engine.generate

    def spy(tokens, **kw):
        prompts.append(list(tokens))
        return orig(tokens, **kw)

    engine.generate = spy
    chat_loop(engine, TOK, temperature=0.0, input_fn=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert text.count("[calculator: 2+3 → 5]") == 3  # hello, again, hi
    assert "context" in text and "(conversation cleared)" in text
    # "again" saw the history of "hello" (the over-long message was dropped); "hi" started afresh
    hello = TOK.render_for_completion([{"role": "user", "content": "hello"}])
    assert prompts[0] == hello
    assert prompts[1][:len(hello)] == hello and len(prompts[1]) > len(hello) + 10
    assert prompts[2] == TOK.render_for_completion([{"role": "user", "content": "hi"}])
    # EOF ends the loop too
    chat_loop(engine, TOK, input_fn=lambda _: (_ for _ in ()).throw(EOFError), out=io.StringIO())
