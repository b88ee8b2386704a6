"""The recipe's optional model pieces (GPTConfig fields) and Muon variants, each on its own and all together:
incremental decoding equals the full forward under every cache, a few steps lower the loss, checkpoints round
trip, a meta without the fields loads as the model before them, and LoRA, quantization and packing still work."""
import dataclasses
import json

import pytest
import torch

from nanochat.checkpoint_manager import build_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.fastlinear import pack_linears, packing_supported
from nanochat.gpt import GPT, GPTConfig, config_overrides, window_mask, window_sizes
from nanochat.kv_cache import KVCache, RaggedKVCache, StaticKVCache
from nanochat.lora.adapter import LoRA
from nanochat.lora.quant import quantize_base
from nanochat.muon import Muon, normalize_neurons, zeropower_via_newtonschulz5
from nanochat.reshard import full_optimizer_states, load_resharded
from nanochat.tokenizer import Tokenizer
from nanochat.tools.registry import ToolRegistry

pytestmark = pytest.mark.usefixtures("one_thread")

V = 265  # the byte-level tokenizer's vocabulary (build_model checks it)
FEATURES = {
    "value_embeds": dict(value_embeds=True),
    "resid_scalars": dict(resid_scalars=True),
    "smear": dict(smear=True),
    "backout": dict(backout=True),
    "window": dict(window_pattern="SL"),
    "init": dict(qk_gain=1.44, rope_base=1e5, embed_init_std=0.8, fc_init_scale=0.4),
}
OPTIM = {  # Muon's variants: they change training, not the forward
    "polar_express": dict(polar_express=True),
    "normuon": dict(normuon=True),
    "muon_wd": dict(muon_weight_decay=0.1),
}
WITH_PARAMS = list(FEATURES)
WITH_PARAMS.remove("window")
WITH_PARAMS.remove("init")
FEATURES["all"] = {k: v for f in [*FEATURES.values(), *OPTIM.values()] for k, v in f.items()}
WITH_PARAMS.append("all")
NEW_FIELDS = set(FEATURES["all"])


def make_model(seed=0, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, seq=64, **options):
    """A tiny model with the options on, its zero- and constant-initialised parameters randomised so every
    piece changes the output (at init several are exact no-ops, which would hide a broken cache path)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                          n_embd=n_embd, **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(std=0.1)
            elif name.endswith("ve_gate.weight"):
                p.normal_(std=1.0)
            elif name.endswith("_lambdas"):
                p.add_(torch.randn_like(p) * 0.2)
            elif name == "smear_lambda":
                p.fill_(0.7)
    return model.eval()


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def cache_for(model, batch, seq_len=64):
    c = model.config
    return KVCache(batch, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)


def test_config_overrides_parse_and_refuse():
    assert config_overrides("") == {}
    assert config_overrides("value_embeds=1, softcap=20,n_layer=3") == dict(value_embeds=True, softcap=20.0, n_layer=3)
    assert config_overrides("value_embeds=off") == dict(value_embeds=False)
    with pytest.raises(ValueError, match="name one of"):
        config_overrides("value_embed=1")
    with pytest.raises(ValueError, match="1/0"):
        config_overrides("value_embeds=maybe")
    with pytest.raises(ValueError, match="expected a float"):
        config_overrides("softcap=high")


def test_defaults_add_nothing():
    """With every field at its default the model has exactly the parameters it had before the recipe."""
    model = make_model()
    names = {n for n, _ in model.named_parameters()}
    assert all(n.startswith(("transformer.wte.", "transformer.h.", "lm_head.")) for n in names)
    assert not any("ve_gate" in n for n in names)
    assert model.windows == [None] * 3
    assert not any(getattr(GPTConfig(), k) for k in NEW_FIELDS if k in ("value_embeds", "resid_scalars", "smear",
                                                                       "backout", "muon_weight_decay"))
    assert model.transformer.h[0].attn.scale is None and model.config.rope_base == 10000.0


def plain_copy(model, keep=()):
    """The model without any recipe piece (but those in keep), sharing every weight the two have in common."""
    off = {k: GPTConfig.__dataclass_fields__[k].default for k in NEW_FIELDS if k not in keep}
    plain = GPT(dataclasses.replace(model.config, **off))
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return plain.eval()


NEUTRAL = {  # values of each piece's parameters that make it a no-op, by parameter name suffix
    "value_embeds.": 0.0,
    "resid_lambdas": 1.0,
    "x0_lambdas": 0.0,
    "smear_lambda": 0.0,
    "backout_lambda": 0.0,
}


@pytest.mark.parametrize("feature", WITH_PARAMS)
@torch.no_grad()
def test_each_piece_reduces_to_the_plain_model_when_neutral(feature):
    """The formulas: with its parameters at their neutral values a piece changes nothing; away from them it does."""
    model = make_model(**FEATURES[feature])
    idx = torch.randint(0, V, (2, 20))
    before = model(idx)
    for name, p in model.named_parameters():
        for suffix, value in NEUTRAL.items():
            if name.startswith(suffix) or name.endswith(suffix):
                p.fill_(value)
    close(model(idx), plain_copy(model, keep=["window_pattern", *FEATURES["init"]])(idx), tol=1e-5)
    assert not torch.allclose(before, model(idx), atol=1e-3)


@pytest.mark.parametrize("feature", FEATURES)
@torch.no_grad()
def test_decode_matches_full_forward(feature):
    """KVCache: whole prefill, prefill + one token at a time, uneven chunks; a batch-1 prefill cloned into rows
    that then diverge; StaticKVCache loaded from it."""
    model = make_model(**FEATURES[feature])
    idx = torch.randint(0, V, (2, 20))
    full = model(idx)
    close(model(idx, kv_cache=cache_for(model, 2)), full)
    cache = cache_for(model, 2)
    out = [model(idx[:, :7], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
    close(torch.cat(out, 1), full)
    cache = cache_for(model, 2)
    out = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 6), (6, 13), (13, 20)]]
    close(torch.cat(out, 1), full)

    prompt, cont = torch.randint(0, V, (1, 9)), torch.randint(0, V, (3, 6))
    one = cache_for(model, 1)
    model(prompt, kv_cache=one)
    many = cache_for(model, 3)
    many.prefill(one)
    c = model.config
    static = StaticKVCache(3, c.n_kv_head, 32, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)
    static.load(one)
    for cache in (many, static):
        steps = [model(cont[:, t:t + 1], kv_cache=cache) for t in range(4)]
        out = torch.cat(steps + [model(cont[:, 4:], kv_cache=cache)], 1)
        for r in range(3):
            close(out[r], model(torch.cat([prompt[0], cont[r]])[None])[0, 9:])


@pytest.mark.parametrize("feature", FEATURES)
@torch.no_grad()
def test_ragged_rows_match_full_forward(feature):
    """The server's cache: slots of different lengths in one forward (right-padded rows), a slot reused after
    reset, rows continuing out of order."""
    model = make_model(**FEATURES[feature])
    c = model.config
    cache = RaggedKVCache(3, c.n_kv_head, c.n_embd // c.n_head, c.n_layer, seq_len=64)
    seqs = [torch.randint(0, V, (n,)) for n in (30, 7, 20)]  # past the window (16) of the S layers
    fed = [0, 0, 0]
    out = [[], [], []]

    def feed(slots, counts):
        T = max(counts)
        ids = torch.zeros(len(slots), T, dtype=torch.long)
        for i, (s, n) in enumerate(zip(slots, counts)):
            ids[i, :n] = seqs[s][fed[s]:fed[s] + n]
        logits = model(ids, kv_cache=cache.rows(slots, counts))
        for i, (s, n) in enumerate(zip(slots, counts)):
            out[s].append(logits[i, :n])
            fed[s] += n

    feed([0, 1, 2], [12, 2, 5])  # prefills of different lengths
    feed([2, 0], [1, 8])         # out of order, uneven
    feed([0, 1, 2], [1, 1, 1])   # decode steps
    feed([1, 0, 2], [2, 3, 6])
    for s in range(3):
        close(torch.cat(out[s]), model(seqs[s][None])[0, :fed[s]])
    cache.reset(1)  # a new sequence in slot 1
    fed[1], out[1], seqs[1] = 0, [], torch.randint(0, V, (6,))
    feed([1], [4])
    feed([1, 0], [2, 1])
    close(torch.cat(out[1]), model(seqs[1][None])[0])


@pytest.mark.parametrize("feature", [*FEATURES, *OPTIM])
def test_training_steps_lower_the_loss_and_move_every_parameter(feature):
    model = make_model(**{**FEATURES, **OPTIM}[feature]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = model.setup_optimizers(unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.02)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (4, 33), generator=g)
    losses = []
    for _ in range(8):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers.values():
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    still = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not still, f"parameters the optimizers never moved: {still}"


@pytest.mark.parametrize("feature", FEATURES)
def test_checkpoint_round_trip(feature, base_dir, tmp_path):
    model = make_model(**FEATURES[feature])
    meta = {"step": 3, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(str(tmp_path / "ck"), 3, model.state_dict(), None, meta)
    loaded, _, meta2 = build_model(str(tmp_path / "ck"), 3, "cpu", "eval")
    assert loaded.config == model.config and meta2["model_config"] == meta["model_config"]
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_old_meta_loads_with_every_piece_off(base_dir, tmp_path):
    """A checkpoint saved before the recipe has none of its fields in the meta: it loads, as the model it was."""
    model = make_model()
    old = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in NEW_FIELDS}
    save_checkpoint(str(tmp_path / "ck"), 1, model.state_dict(), None, {"step": 1, "model_config": old})
    with open(tmp_path / "ck" / "meta_000001.json") as f:
        assert not NEW_FIELDS & set(json.load(f)["model_config"])
    loaded, _, _ = build_model(str(tmp_path / "ck"), 1, "cpu", "eval")
    assert loaded.config == GPTConfig(**old) == plain_copy(model).config and loaded.windows == [None] * 3
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_window_sizes_and_refusals():
    c = GPTConfig(sequence_len=64, n_layer=6, window_pattern="ssl")
    assert window_sizes(c) == [16, 16, None, 16, 16, None]
    assert window_sizes(dataclasses.replace(c, window_pattern="S")) == [16] * 5 + [None]  # the last layer: full
    with pytest.raises(ValueError, match="S \\(short\\) and L"):
        window_sizes(dataclasses.replace(c, window_pattern="SXL"))
    assert window_mask(torch.arange(5), 5, 2).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


@torch.no_grad()
def test_window_hides_keys_further_back():
    """A windowed layer's output at position p does not move when an input more than w positions back does, and
    does when one inside the window does; a whole model whose inputs fit in the window is the plain model."""
    model = make_model(window_pattern="SL")
    attn, w = model.transformer.h[0].attn, model.windows[0]
    assert w == 16
    T = 40
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    mask = model._window_masks(0, T, None, "cpu")[w]
    x = torch.randn(1, T, 64)
    y = attn(x, cos, sin, mask=mask)
    x2 = x.clone()
    x2[0, 5] += 1.0
    y2 = attn(x2, cos, sin, mask=mask)
    assert torch.equal(y[0, 22:], y2[0, 22:]) and not torch.allclose(y[0, 5:22], y2[0, 5:22])
    idx = torch.randint(0, V, (2, w + 1))  # every query sees all its keys: no mask at all
    assert model._window_masks(0, w + 1, None, "cpu") == {}
    assert torch.equal(model(idx), plain_copy(model)(idx))
    long = torch.randint(0, V, (2, T))
    assert not torch.allclose(model(long), plain_copy(model)(long), atol=1e-3)


@torch.no_grad()
def test_qk_gain_scales_the_attention_logits_and_init_follows_its_fields():
    """The attention of a qk_gain model is softmax(gain * q.k / sqrt(D)) of its own QK-normed rotated q and k."""
    model = make_model(n_head=2, n_kv_head=2, qk_gain=1.44, embed_init_std=0.8, fc_init_scale=0.4, rope_base=1e5)
    attn, T, D = model.transformer.h[0].attn, 10, 32
    x = torch.randn(1, T, 64)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    from nanochat.gpt import apply_rotary_emb, norm
    q = norm(apply_rotary_emb(attn.c_q(x).view(1, T, 2, D), cos, sin)).transpose(1, 2)
    k = norm(apply_rotary_emb(attn.c_k(x).view(1, T, 2, D), cos, sin)).transpose(1, 2)
    v = attn.c_v(x).view(1, T, 2, D).transpose(1, 2)
    logits = 1.44 * q @ k.mT / D ** 0.5
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, T, 64)
    close(attn(x, cos, sin), attn.c_proj(y), tol=1e-5)
    fresh = GPT(dataclasses.replace(model.config, n_embd=256, n_head=2, n_kv_head=2))
    assert abs(fresh.transformer.wte.weight.std().item() - 0.8) < 0.01
    assert abs(fresh.transformer.h[0].mlp.c_fc.weight.std().item() - 0.4 / 16) < 0.001
    assert abs(fresh.transformer.h[0].attn.c_q.weight.std().item() - 1 / 16) < 0.002
    angle = torch.atan2(fresh.sin[0, 1, 0, 1], fresh.cos[0, 1, 0, 1])  # position 1, pair 1: 1 / base^(2/128)
    close(angle, torch.tensor(1e5 ** (-2 / 128)))


def test_engine_decodes_every_piece_as_a_full_recompute(monkeypatch):
    """The Engine's two decode paths (a growing KVCache; compile=True's StaticKVCache, with torch.compile
    replaced by the identity to stay fast) give the tokens a greedy full recompute gives (which, like the
    Engine, never picks the tool-output markers: only a tool writes those)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    model = make_model(**FEATURES["all"])
    tok = Tokenizer.byte_level()
    prompt = [tok.get_bos_token_id()] + list(range(40, 70))
    ids = list(prompt)
    ban = Engine(model, tok).ban
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(ban(model(torch.tensor([ids]))[:, -1]).argmax()))
    for engine in (Engine(model, tok, tools=ToolRegistry()), Engine(model, tok, compile=True)):
        rows, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
        stop = next((i for i, t in enumerate(ids[len(prompt):]) if t in engine.stop_tokens), 12)
        assert rows == [ids[len(prompt):len(prompt) + stop]] * 2


@torch.no_grad()
def test_lora_on_every_piece():
    """Adapters hook the block Linears: with every piece on, a zero adapter changes nothing, a trained-looking
    one changes the output, and decoding under it matches its full forward."""
    model = make_model(**FEATURES["all"])
    idx = torch.randint(0, V, (2, 12))
    base = model(idx)
    lora = LoRA(model)
    lora.add("a", rank=4, alpha=8)
    lora.activate("a")
    close(model(idx), base, tol=1e-6)
    for b in lora.adapters["a"].B:
        b.normal_(std=0.05)
    adapted = model(idx)
    assert not torch.allclose(adapted, base, atol=1e-3)
    cache = cache_for(model, 2)
    out = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(5, 12)]
    close(torch.cat(out, 1), adapted)


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_quantized_base_with_every_piece(bits):
    """quantize_base keeps every piece's own tables and gates as they are; the model stays close to the
    unquantized one and decodes as its own full forward."""
    model = make_model(**FEATURES["all"])
    idx = torch.randint(0, V, (2, 12))
    ref = model(idx)
    quantize_base(model, bits=bits)
    q = model(idx)
    assert (q - ref).abs().mean() < (0.05 if bits == 8 else 0.3) * ref.abs().mean()
    cache = cache_for(model, 2)
    out = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(5, 12)]
    close(torch.cat(out, 1), q)


@pytest.mark.skipif(not packing_supported("cpu")[0], reason=packing_supported("cpu")[1])
@torch.no_grad()
def test_packed_linears_with_every_piece():
    model = make_model(**FEATURES["all"])
    idx = torch.randint(0, V, (2, 12))
    ref = model(idx)
    pack_linears(model)
    packed = model(idx)
    assert (packed - ref).abs().max() < 0.1 * ref.abs().max()
    cache = cache_for(model, 2)
    out = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(5, 12)]
    close(torch.cat(out, 1).float(), packed.float(), tol=2e-2)


def conditioned(shape, cond, seed=0):
    """A matrix with singular values spread log-evenly from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    n = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g))
    W, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g))
    return U @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n)) @ W.T


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_polar_express_lands_closer_to_orthogonal(shape):
    """Five iterations of either keep the direction; Polar Express's singular values end up nearer 1."""
    G = conditioned(shape, 100)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    devs = []
    for pe in (False, True):
        X = zeropower_via_newtonschulz5(G, dtype=torch.float32, polar_express=pe)
        s = torch.linalg.svdvals(X)
        devs.append((s - 1).abs().mean().item())
        assert (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm()) > 0.95
    assert 0.8 < s.min() and s.max() < 1.2
    assert devs[1] < 0.6 * devs[0], devs


def test_normalize_neurons_equalises_rows_and_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    update = torch.randn(2, 24, 8, generator=g) * torch.linspace(0.1, 3, 24)[:, None]  # tall: per-row scales
    states = [{}, {}]
    out = normalize_neurons(update, states, beta2=0.9)
    assert states[0]["neuron_sq"].shape == (24, 1)
    rms = out.square().mean(-1).sqrt()
    assert (rms.max(-1).values / rms.min(-1).values < 1.001).all()  # one step: the EMA is the row's own square
    torch.testing.assert_close(out.norm(dim=(-2, -1)), update.norm(dim=(-2, -1)))
    assert normalize_neurons(torch.randn(1, 8, 24, generator=g), [{}], 0.9).shape == (1, 8, 24)
    wide = [{}]
    normalize_neurons(torch.randn(1, 8, 24, generator=g), wide, 0.9)
    assert wide[0]["neuron_sq"].shape == (1, 24)  # wide: per column


def test_cautious_weight_decay_only_where_the_update_pulls_to_zero():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 16))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5, ns_dtype=torch.float32)
    p.grad = torch.zeros_like(p)  # no update: every entry "agrees", the whole matrix decays
    opt.step()
    torch.testing.assert_close(p.detach(), start * (1 - 0.1 * 0.5))
    p.grad = torch.randn(16, 16)
    before = p.detach().clone()
    update = zeropower_via_newtonschulz5(p.grad[None], dtype=torch.float32)[0]
    opt.step()
    expected = before - 0.1 * update - 0.1 * 0.5 * before * ((update * before) >= 0)
    torch.testing.assert_close(p.detach(), expected)
    assert ((update * before) < 0).any()


def test_reshard_carries_every_muon_state():
    """A one-rank checkpoint of a NorMuon run resumes with the neuron EMA as well as the momentum."""
    model = make_model(normuon=True).train()
    optimizers = model.setup_optimizers()
    model(torch.randint(0, V, (2, 17))[:, :-1], torch.randint(0, V, (2, 16))).backward()
    for opt in optimizers.values():
        opt.step()
    shards = [{kind: opt.state_dict() for kind, opt in optimizers.items()}]
    adamw_params = [p for group in optimizers["adamw"].param_groups for p in group["params"]]
    muon_params = [p for group in optimizers["muon"].param_groups for p in group["params"]]
    fresh = model.setup_optimizers()
    load_resharded(fresh, *full_optimizer_states(adamw_params, muon_params, shards, 1), 0, 1)
    for p in muon_params:
        assert set(fresh["muon"].state[p]) == {"momentum_buffer", "neuron_sq"}
        assert torch.equal(fresh["muon"].state[p]["neuron_sq"], optimizers["muon"].state[p]["neuron_sq"])


@pytest.mark.parametrize("feature", [f for f in FEATURES if f not in ("all", "init", "value_embeds")])
def test_hf_export_refuses_a_piece_it_cannot_express(feature):
    """Pieces that change the forward are refused by name (native NanoChat and our modeling file lack them);
    qk_gain, rope_base and value embeddings go through our modeling file; init and optimizer settings export
    natively, and every piece off is plain NanoChat."""
    pytest.importorskip("transformers")
    from nanochat.hf.convert import ConversionError, choose_layout
    config = GPTConfig(**FEATURES[feature])
    forward = {k: v for k, v in FEATURES[feature].items() if k not in ("embed_init_std", "fc_init_scale")}
    with pytest.raises(ConversionError, match=f"{next(iter(forward))}="):
        choose_layout(config)
    with pytest.raises(ConversionError, match=f"{next(iter(forward))}="):
        choose_layout(config, remote=True)  # asking for our modeling file does not skip the check
    assert choose_layout(GPTConfig(embed_init_std=0.8, fc_init_scale=0.4, polar_express=True, normuon=True,
                                   muon_weight_decay=0.1)) == "native"
    assert choose_layout(GPTConfig(**FEATURES["init"])) == "remote"
    assert choose_layout(GPTConfig(value_embeds=True)) == "remote"
