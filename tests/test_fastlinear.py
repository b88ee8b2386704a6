"""fastlinear: packed bf16 Linears against F.linear at every row count, what pack_linears swaps, and its refusals
(no native bf16, not CPU, a LoRA attached before or after). Greedy tokens and the KV cache: tests/test_engine.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import fastlinear
from nanochat.fastlinear import PackedLinear, pack_linears, packing_supported
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora.adapter import LoRA

NEEDS_PACKING = pytest.mark.skipif(not packing_supported("cpu")[0], reason=packing_supported("cpu")[1])


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)).eval()


@NEEDS_PACKING
@pytest.mark.parametrize("rows_hint", [1, 8, 64])
def test_packed_linear_matches_f_linear_at_any_row_count(rows_hint):
    """One packed weight, whatever row count it was packed for, gives F.linear's bf16 result for 1..300 rows
    and for (B, T, in) inputs: within one bf16 rounding of the fp32 product of the same bf16 values."""
    torch.manual_seed(1)
    lin = nn.Linear(192, 320, bias=False)
    p = PackedLinear(lin, rows_hint)
    w = lin.weight.detach().bfloat16()
    for shape in [(1, 192), (3, 192), (8, 192), (300, 192), (2, 5, 192), (4, 1, 192)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y = p(x)
        exact = F.linear(x.bfloat16().float(), w.float())
        assert y.dtype == torch.bfloat16 and y.shape == shape[:-1] + (320,)
        torch.testing.assert_close(y.float(), exact, rtol=2 ** -7, atol=1e-2)
        torch.testing.assert_close(y, F.linear(x.bfloat16(), w), rtol=2 ** -7, atol=1e-2)


@NEEDS_PACKING
def test_pack_linears_swaps_every_linear_and_freezes():
    model = tiny_gpt()
    with torch.no_grad():
        want = model(torch.tensor([[1, 2, 3, 4]]))
    model = pack_linears(tiny_gpt())
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # per block q, k, v as one (c_qkv), c_proj, c_fc, c_proj; and the lm_head
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2 * 4 + 1
    assert model.transformer.h[0].attn.c_qkv.out_features == 64 + 2 * 32  # 2 query heads of 32, 1 kv head
    # the rest (the embedding) keeps its fp32; nothing trains
    assert not model.training and all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not any(k.endswith(("c_q.weight", "lm_head.weight")) for k in model.state_dict())  # not a checkpoint
    with torch.no_grad():
        got = model(torch.tensor([[1, 2, 3, 4]]))
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)
    with pytest.raises(RuntimeError, match="inference-only"):
        model.lm_head(torch.randn(1, 64, requires_grad=True))


def test_pack_linears_refuses_without_native_bf16_or_off_cpu(monkeypatch):
    monkeypatch.setattr(fastlinear, "native_bf16_cpu", lambda: False)
    with pytest.raises(RuntimeError, match="no native bf16"):
        pack_linears(tiny_gpt())
    ok, reason = packing_supported("cuda")
    assert not ok and "CPU fast path" in reason
    ok, reason = packing_supported(torch.device("mps"))
    assert not ok and "mps" in reason


def test_pack_linears_refuses_a_model_with_a_lora():
    model = tiny_gpt()
    lora = LoRA(model)
    with pytest.raises(RuntimeError, match="LoRA attached"):
        pack_linears(model)
    lora.close()
    assert all(isinstance(m.attn.c_q, nn.Linear) for m in model.transformer.h)  # untouched


@NEEDS_PACKING
def test_lora_refuses_a_packed_model():
    with pytest.raises(RuntimeError, match="packed for inference"):
        LoRA(pack_linears(tiny_gpt()))
