"""The softcapped cross-entropy with its own backward equals F.cross_entropy over softcapped logits."""
import pytest
import torch
import torch.nn.functional as F

from nanochat.softcap_loss import softcap, softcapped_cross_entropy

CAP = 15.0


def reference(logits, targets, reduction):
    z = CAP * torch.tanh(logits.float() / CAP)
    return F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)


def inputs(dtype, n=24, v=40, scale=20.0):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)  # large: the cap is active
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -1
    return logits, targets


def test_softcap_is_tanh_and_bounded():
    x = torch.linspace(-200, 200, 1001)
    torch.testing.assert_close(softcap(x, CAP), CAP * torch.tanh(x / CAP), atol=1e-5, rtol=0)
    assert softcap(x, CAP).abs().max() <= CAP and softcap(x.bfloat16(), CAP).dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_cross_entropy(reduction, dtype):
    logits, targets = inputs(dtype)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    got, want = softcapped_cross_entropy(a, targets, CAP, reduction), reference(b, targets, reduction)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if reduction == "none":
        assert (got[targets == -1] == 0).all()
    weights = torch.rand(got.shape, generator=torch.Generator().manual_seed(1))  # a non-uniform upstream gradient
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: the gradient is rounded to bf16 once
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=1e-2)
    assert (a.grad[targets == -1] == 0).all()


def test_unknown_reduction_is_a_clear_error():
    logits, targets = inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction must be"):
        softcapped_cross_entropy(logits, targets, CAP, "average")


def test_model_loss_uses_it_and_agrees_with_its_logits():
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    torch.nn.init.normal_(model.lm_head.weight, std=2.0)  # logits past the cap
    idx = torch.randint(0, 64, (2, 16))
    targets = idx.roll(-1, 1)
    targets[:, -3:] = -1
    loss = model(idx, targets)
    with torch.no_grad():
        logits = model(idx)
    want = F.cross_entropy(logits.view(-1, 64), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.lm_head.weight.grad.isfinite().all() and model.lm_head.weight.grad.abs().sum() > 0
