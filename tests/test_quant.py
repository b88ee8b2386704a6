"""Int8 weight-only base: close to the fp32 layers, ~4x smaller, and LoRA adapters train and persist on it."""
import pytest
import torch
import torch.nn.functional as F

from nanochat.lora import AdapterBaseMismatch, LoRA
from nanochat.lora_io import load_adapter, save_adapter
from nanochat.quant import Int8Embedding, Int8Linear, quantize_base, quantize_blocks, weight_bytes
from tests.test_lora import make_model, train_on_frozen_base

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert 3.5 < sizes["fp_bytes"] / sizes["int8_bytes"] <= 4.0  # fp32 -> int8 + one fp32 scale per row
    assert isinstance(model.transformer.h[0].attn.c_q, Int8Linear)
    with torch.no_grad():
        assert (model(x) - fp(x)).abs().max() < 0.05 * fp(x).abs().max()
    lora = LoRA(model)
    ad = lora.add("q", rank=4, alpha=8, seed=0)
    lora.activate("q")
    train_on_frozen_base(model, ad, x, steps=8)  # the int8 base never moves
    with pytest.raises(RuntimeError, match="quantized"):
        lora.merge()
    out = model(x)
    save_adapter(lora, "q", str(tmp_path / "q"))
    lora.remove("q")
    load_adapter(lora, str(tmp_path / "q"), activate=True)
    assert torch.equal(model(x), out)
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
    assert sizes["fp_bytes"] == total_fp and 3.7 < total_fp / sizes["int8_bytes"] < 3.9
    assert weight_bytes(model) - sizes["int8_bytes"] == weight_bytes(fp) - total_fp  # only buffers stay (rotary)
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
