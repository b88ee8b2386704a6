"""GPT model: KV-cache equivalence, FLOP/parameter counts, meta-device init, a few training steps."""
import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache, StaticKVCache

V = 256


def make_model(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, seq=64, random_proj=True, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                          n_embd=n_embd))
    if random_proj:
        # zero output projections make every block the identity; randomise them (and give the lm_head
        # real scale) so the cache tests actually exercise attention
        with torch.no_grad():
            for block in model.transformer.h:
                torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
                torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
            torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    return model.eval()


def new_cache(model, batch, seq_len=64):
    c = model.config
    return KVCache(batch, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


@torch.no_grad()
def test_logits_at_returns_only_those_positions():
    model = make_model()
    idx = torch.randint(0, V, (3, 12))
    full = model(idx)
    # the head runs on 3 rows instead of 36: oneDNN may block those matmuls differently, so equal to rounding
    close(model(idx, logits_at=-1), full[:, -1])
    at = torch.tensor([0, 11, 5])
    close(model(idx, logits_at=at), full[torch.arange(3), at])
    assert model(idx, logits_at=at).shape == (3, V)
    cache = new_cache(model, 3)  # a prefill into the cache: the cache holds every position all the same
    close(model(idx, kv_cache=cache, logits_at=-1), full[:, -1])
    close(model(idx[:, :1], kv_cache=cache), model(torch.cat([idx, idx[:, :1]], 1))[:, -1:])


@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
@torch.no_grad()
def test_kv_cache_matches_full_forward(n_head, n_kv_head):
    model = make_model(n_head=n_head, n_kv_head=n_kv_head)
    idx = torch.randint(0, V, (2, 20))
    full = model(idx)
    assert full.shape == (2, 20, V)

    # prefill everything at once
    cache = new_cache(model, 2)
    close(model(idx, kv_cache=cache), full)
    assert cache.get_pos() == 20

    # prefill a prompt, then decode one token at a time
    cache = new_cache(model, 2)
    out = [model(idx[:, :7], kv_cache=cache)]
    for t in range(7, 20):
        out.append(model(idx[:, t:t + 1], kv_cache=cache))
    close(torch.cat(out, dim=1), full)

    # chunked prefill: chunks attend to the cached prefix and causally within themselves
    cache = new_cache(model, 2)
    out = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 6), (6, 13), (13, 20)]]
    close(torch.cat(out, dim=1), full)


@torch.no_grad()
def test_kv_cache_grows_past_capacity():
    model = make_model(n_kv_head=2)
    idx = torch.randint(0, V, (1, 40))
    cache = new_cache(model, 1, seq_len=8)
    out = [model(idx[:, :6], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(6, 40)]
    close(torch.cat(out, dim=1), model(idx))


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (4, 1)])
@torch.no_grad()
def test_prefill_clone_to_batch(n_head, n_kv_head):
    model = make_model(n_head=n_head, n_kv_head=n_kv_head)
    prompt = torch.randint(0, V, (1, 9))
    one = new_cache(model, 1)
    model(prompt, kv_cache=one)
    n = 3
    many = new_cache(model, n)
    many.prefill(one)
    assert many.get_pos() == 9
    cont = torch.randint(0, V, (n, 5))  # a different continuation in every row
    out = torch.cat([model(cont[:, t:t + 1], kv_cache=many) for t in range(5)], dim=1)
    for r in range(n):
        full = model(torch.cat([prompt[0], cont[r]])[None])
        close(out[r], full[0, 9:])


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 1)])
@torch.no_grad()
def test_static_kv_cache_matches_full_forward(n_head, n_kv_head):
    """The compile-friendly cache: a batch-1 prefill loaded into every row, then one token at a time
    (and one 3-token chunk) attending over the whole capacity under the mask."""
    model = make_model(n_head=n_head, n_kv_head=n_kv_head)
    c = model.config
    prompt = torch.randint(0, V, (1, 9))
    one = new_cache(model, 1)
    model(prompt, kv_cache=one)
    n = 3
    static = StaticKVCache(n, c.n_kv_head, 32, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)
    static.load(one)
    assert static.get_pos() == 9
    cont = torch.randint(0, V, (n, 8))  # a different continuation in every row
    out = [model(cont[:, t:t + 1], kv_cache=static) for t in range(5)] + [model(cont[:, 5:8], kv_cache=static)]
    out = torch.cat(out, dim=1)
    assert static.get_pos() == 17 and static.kv.shape[-2] == 32  # never grows: the shapes stay fixed
    for r in range(n):
        full = model(torch.cat([prompt[0], cont[r]])[None])
        close(out[r], full[0, 9:])


def test_estimate_flops_and_num_params_hand_count():
    d, L, Vv, T, nh, nkv = 64, 2, 256, 32, 4, 2
    model = GPT(GPTConfig(sequence_len=T, vocab_size=Vv, n_layer=L, n_head=nh, n_kv_head=nkv, n_embd=d))
    hd = d // nh
    per_layer = d * d + 2 * d * (nkv * hd) + d * d + d * 4 * d + 4 * d * d  # q, k+v, proj, fc, mlp proj
    matmul = L * per_layer + d * Vv  # + lm_head
    assert model.num_params() == Vv * d + matmul  # + embedding table
    assert model.estimate_flops() == 6 * matmul + 12 * L * d * T


def test_meta_init_loss_and_backward():
    cfg = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=128)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
    assert model.cos.device.type == "cpu" and torch.isfinite(model.cos).all()
    idx = torch.randint(0, 512, (4, 32))
    loss = model(idx, idx.roll(-1, 1))
    assert abs(loss.item() - math.log(512)) < 0.05
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    # loss reductions and ignore_index
    targets = idx.roll(-1, 1)
    targets[:, :5] = -1
    per_tok = model(idx, targets, loss_reduction="none")
    assert per_tok.shape == (4, 32) and torch.all(per_tok[:, :5] == 0)
    total = model(idx, targets, loss_reduction="sum")
    mean = model(idx, targets)
    close(per_tok.sum(), total)
    close(mean, total / (targets != -1).sum())


def test_softcap_bounds_logits():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
        logits = model(torch.randint(0, V, (1, 8)))
    assert logits.dtype == torch.float32 and logits.abs().max() <= model.config.softcap


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    optimizers = model.setup_optimizers()
    assert isinstance(optimizers["adamw"], torch.optim.AdamW)
    idx = torch.randint(0, V, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(10):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@torch.no_grad()
def test_generate_greedy_matches_argmax():
    model = make_model()
    prompt = [1, 2, 3, 4]
    got = list(model.generate(prompt, 6, temperature=0.0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[4:]
