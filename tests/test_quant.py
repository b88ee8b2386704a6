"""Int8 and 4-bit weight-only bases: close to the fp32 layers, ~4x / ~7x smaller, and LoRA adapters train and
persist on them."""
import pytest
import torch
import torch.nn.functional as F

from nanochat.lora.adapter import AdapterBaseMismatch, LoRA, model_state_hash
from nanochat.lora.quant import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    pack4,
    quantize_base,
    quantize_blocks,
    weight_bytes,
)
from nanochat.lora.storage import load_adapter, save_adapter
from tests.test_lora import make_model, train_on_frozen_base


def unpack4(packed):
    """pack4's inverse: (..., n / 2) uint8 -> (..., n) uint8 in 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)

pytestmark = pytest.mark.usefixtures("one_thread")


def adapter_round_trip(model, x, path):
    """On a quantized base: an adapter trains (the base never moves), merging it is refused, and it saves to
    `path` and loads back to the same outputs; serving it never folds it into the weights. -> (lora, adapter)."""
    lora = LoRA(model)
    ad = lora.add("q", rank=4, alpha=8, seed=0)
    lora.activate("q")
    train_on_frozen_base(model, ad, x, steps=8)
    with pytest.raises(RuntimeError, match="quantized"):
        lora.merge()
    out = model(x)
    with torch.no_grad():
        for _ in range(lora.fold_after + 1):  # serving keeps the hooks: nothing to fold a stack into
            with lora.per_row([ad] * len(x)):
                torch.testing.assert_close(model(x), out)
    assert lora._fold is None
    save_adapter(lora, "q", str(path))
    lora.remove("q")
    load_adapter(lora, str(path), activate=True)
    assert torch.equal(model(x), out)
    return lora, ad


def test_int8_linear_matches_its_dequantized_weight_and_passes_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,)
    assert (q.dequantize() - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # rounding: half a step
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, q.dequantize())
    assert torch.allclose(y, ref, atol=1e-5)
    assert (y - lin(x)).abs().max() < 0.02 * lin(x).abs().max()
    y.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-4)
    with pytest.raises(ValueError, match="bias-free"):
        Int8Linear(torch.nn.Linear(4, 4))


def test_adapters_train_and_persist_on_a_quantized_base(tmp_path):
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    fp = make_model()
    model = make_model()
    sizes = quantize_blocks(model)
    assert 3.5 < sizes["fp_bytes"] / sizes["quant_bytes"] <= 4.0  # fp32 -> int8 + one fp32 scale per row
    assert isinstance(model.transformer.h[0].attn.c_q, Int8Linear)
    with torch.no_grad():
        assert (model(x) - fp(x)).abs().max() < 0.05 * fp(x).abs().max()
    lora, _ = adapter_round_trip(model, x, tmp_path / "q")
    # bound to the int8 base: the fp32 model refuses it
    with pytest.raises(AdapterBaseMismatch):
        load_adapter(LoRA(fp), str(tmp_path / "q"))
    with pytest.raises(RuntimeError, match="before attaching"):
        quantize_blocks(model)


def test_int8_embedding_and_lm_head_dequantize_only_what_they_use():
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    fp = make_model()
    model = make_model()
    emb = model.transformer.wte.weight.detach().clone()
    sizes = quantize_base(model)
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, Int8Embedding) and isinstance(head, Int8Linear) and wte.weight.dtype == torch.int8
    # a lookup is exactly the gathered int8 rows times their scales, within half a step of the fp32 table
    rows = wte(x)
    assert rows.dtype == torch.float32 and rows.shape == (2, 24, emb.size(1))
    assert torch.equal(rows, wte.weight[x].float() * wte.scale[x][..., None])
    assert ((rows - emb[x]).abs() <= wte.scale[x][..., None] / 2 + 1e-7).all()
    # every weight matrix int8 + one fp32 scale per row (rows of 64 or 256 here: about 3.8x below fp32)
    total_fp = sum(p.numel() * 4 for p in fp.parameters())
    assert sizes["fp_bytes"] == total_fp and 3.7 < total_fp / sizes["quant_bytes"] < 3.9
    assert weight_bytes(model) - sizes["quant_bytes"] == weight_bytes(fp) - total_fp  # only buffers stay (rotary)
    with torch.no_grad():
        assert (model(x) - fp(x)).abs().max() < 0.05 * fp(x).abs().max()
    # an adapter trains on the fully int8 base, which never moves
    lora = LoRA(model)
    ad = lora.add("q", rank=4, alpha=8, seed=0)
    lora.activate("q")
    train_on_frozen_base(model, ad, x, steps=6)


def test_int8_embedding_keeps_a_bf16_models_dtype():
    model = make_model().to(torch.bfloat16)
    quantize_base(model, lm_head=False)
    assert model.transformer.wte(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.bfloat16


# --- 4-bit -----------------------------------------------------------------------------------------------

def test_pack4_round_trips_and_representable_weights_quantize_exactly():
    codes = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(0))
    packed = pack4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(packed[0, 0], (codes[0, 0] | codes[0, 1] << 4).to(torch.uint8))  # low nibble first
    assert torch.equal(unpack4(packed), codes.to(torch.uint8))
    for fmt in ("nf4", "int4"):
        levels = Int4Linear(torch.nn.Linear(8, 1, bias=False), group_size=8, fmt=fmt).levels
        # every weight a level times its group's scale (a power of two: exact in fp16), each group holding +1
        g = torch.Generator().manual_seed(1)
        codes = torch.randint(1, 16, (6, 32), generator=g)  # int4's code 0 (-8/7) is never the nearest level
        codes[:, ::8] = 15  # level 1.0: the group's absmax is its scale
        scales = 2.0 ** torch.randint(-6, 2, (6, 4), generator=g).float()
        w = (levels[codes].view(6, 4, 8) * scales[..., None]).view(6, 32)
        lin = torch.nn.Linear(32, 6, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        q = Int4Linear(lin, group_size=8, fmt=fmt)
        assert torch.equal(unpack4(q.weight), codes.to(torch.uint8)) and torch.equal(q.scale.float(), scales)
        assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("fmt,group_size,scale_dtype", [("nf4", 64, torch.float16), ("int4", 32, torch.float32)])
def test_int4_linear_picks_the_nearest_level_and_matches_its_dequantized_weight(fmt, group_size, scale_dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1)
        lin.weight[3, :group_size] = 0  # an all-zero group stays exactly zero
    q = Int4Linear(lin, group_size=group_size, fmt=fmt, scale_dtype=scale_dtype)
    assert q.weight.shape == (48, 64) and q.scale.shape == (48, 128 // group_size) and q.scale.dtype == scale_dtype
    deq = q.dequantize()
    assert torch.equal(deq[3, :group_size], torch.zeros(group_size))
    # every weight within half a step of its group (half the widest gap between levels, times the scale) ...
    scale = q.scale.float().repeat_interleave(group_size, dim=1)
    half_step = (q.levels[1:] - q.levels[:-1]).max() / 2
    assert ((deq - lin.weight).abs() <= scale * half_step * (1 + 1e-5)).all()
    # ... and on the level nearest to it
    to_all = (lin.weight.detach()[..., None] / scale[..., None] - q.levels).abs()
    chosen = ((deq - lin.weight) / scale).abs()
    assert (chosen <= to_all.min(dim=-1).values + 1e-5).all()
    # the forward is one F.linear with the dequantized weight, and gradients reach the input
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, deq)
    assert torch.allclose(y, ref, atol=1e-5)
    assert (y - lin(x)).abs().max() < 0.15 * lin(x).abs().max()
    y.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-4)
    # memory: half a byte per weight, one scale per group, 16 fp32 levels
    assert weight_bytes(q) == 48 * 64 + 48 * (128 // group_size) * q.scale.element_size() + 16 * 4


def test_int4_refuses_bad_shapes_and_options():
    with pytest.raises(ValueError, match="must be even"):
        Int4Linear(torch.nn.Linear(33, 4, bias=False), group_size=3)
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features"):
        Int4Linear(torch.nn.Linear(64, 4, bias=False), group_size=48)
    with pytest.raises(ValueError, match="does not divide embedding_dim"):
        Int4Embedding(torch.nn.Embedding(10, 64), group_size=128)
    with pytest.raises(ValueError, match="unknown 4-bit format"):
        Int4Linear(torch.nn.Linear(64, 4, bias=False), fmt="fp4")
    with pytest.raises(ValueError, match="bias-free"):
        Int4Linear(torch.nn.Linear(64, 4))
    huge = torch.nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        huge.weight.fill_(1e5)
    with pytest.raises(ValueError, match="overflows"):
        Int4Linear(huge)
    assert Int4Linear(huge, scale_dtype=torch.float32).dequantize().eq(1e5).all()
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_base(make_model(), bits=3)
    with pytest.raises(ValueError, match="options of bits=4"):
        quantize_blocks(make_model(), group_size=32)
    model = make_model()
    quantize_blocks(model)
    with pytest.raises(ValueError, match="already a Int8Linear"):
        quantize_blocks(model, bits=4)


def test_adapters_train_and_persist_on_a_4bit_base(tmp_path):
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    fp = make_model()
    model = make_model()
    emb = model.transformer.wte.weight.detach().clone()
    sizes = quantize_base(model, bits=4, group_size=32)
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, Int4Embedding) and isinstance(head, Int4Linear)
    assert isinstance(model.transformer.h[1].mlp.c_proj, Int4Linear)
    # bytes: half a byte per weight + one fp16 scale per 32 + 16 fp32 levels per matrix (2 x 6 + 2 here)
    n = sum(p.numel() for p in fp.parameters())
    assert sizes["fp_bytes"] == 4 * n and sizes["quant_bytes"] == n // 2 + 2 * n // 32 + 14 * 64
    assert weight_bytes(model) - sizes["quant_bytes"] == weight_bytes(fp) - 4 * n  # only buffers stay (rotary)
    # a lookup dequantizes the gathered rows, each within half a step of the fp32 table
    rows = wte(x)
    assert rows.dtype == torch.float32 and rows.shape == (2, 24, 64)
    assert torch.equal(rows, _gathered(wte, x))
    half_step = (wte.levels[1:] - wte.levels[:-1]).max() / 2
    assert ((rows - emb[x]).abs() <= wte.scale[x].float().repeat_interleave(32, -1) * half_step * (1 + 1e-5)).all()
    with torch.no_grad():
        assert (model(x) - fp(x)).abs().max() < 0.3 * fp(x).abs().max()
    _, ad = adapter_round_trip(model, x, tmp_path / "q")
    assert [tuple(a.shape) for a in ad.A][:2] == [(4, 64), (4, 64)]  # shapes from in/out features, not packed
    # bound to the 4-bit base: the fp32 and the int8 model refuse it
    with pytest.raises(AdapterBaseMismatch):
        load_adapter(LoRA(fp), str(tmp_path / "q"))
    int8 = make_model()
    quantize_base(int8)
    with pytest.raises(AdapterBaseMismatch):
        load_adapter(LoRA(int8), str(tmp_path / "q"))


def _gathered(wte, x):
    """Int4Embedding's rows for x, worked out the long way: unpack, look up the level, times the group scale."""
    codes = unpack4(wte.weight[x]).long()
    scale = wte.scale[x].float().repeat_interleave(wte.group_size, -1)
    return wte.levels[codes] * scale


def test_a_4bit_state_dict_round_trips_into_another_quantized_model():
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    model = make_model(seed=0)
    quantize_base(model, bits=4, fmt="int4")
    other = make_model(seed=1)
    quantize_base(other, bits=4, fmt="nf4")  # same shapes; the levels travel in the state_dict
    assert not torch.equal(other(x), model(x))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x)) and model_state_hash(other) == model_state_hash(model)
    assert torch.equal(other.lm_head.levels, torch.arange(-8, 8) / 7)


def test_4bit_base_keeps_a_bf16_models_dtype():
    model = make_model().to(torch.bfloat16)
    quantize_base(model, bits=4)
    x = torch.tensor([[1, 2, 3]])
    assert model.transformer.wte(x).dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert model(x).shape == (1, 3, 265)
