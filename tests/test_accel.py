"""nanochat/accel.py on CPU: --fp8 and --fa3 fall back with a message naming why, and the FA3 branch of the
attention hands the kernel the layout, scale and windows that make it compute what SDPA computes (checked with a
stand-in kernel written from FA3's documented semantics)."""
import pytest
import torch
import torch.nn.functional as F

from nanochat.accel import enable_fp8, fp8_eligible, load_fa3, use_fa3
from nanochat.gpt import GPT, GPTConfig


class StandInFA3:
    """flash_attn_func's contract: q (B, T, H, D), k/v (B, T, Hkv, D), causal, window_size=(left, right) with -1
    unbounded, softmax_scale None = 1/sqrt(D); returns (out (B, T, H, D), lse) like FA3's interface."""
    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
        self.calls.append(window_size)
        B, T, H, D = q.shape
        rep = H // k.size(2)
        q = q.transpose(1, 2)
        k, v = k.transpose(1, 2).repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
        pos = torch.arange(T)
        allowed = pos[None, :] <= pos[:, None] if causal else torch.ones(T, T, dtype=torch.bool)
        if window_size[0] >= 0:
            allowed &= pos[None, :] >= pos[:, None] - window_size[0]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
        return y.transpose(1, 2), None


@pytest.mark.parametrize("options", [{}, dict(window_pattern="SL", qk_gain=1.44, value_embeds=True)])
def test_fa3_branch_matches_sdpa(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(std=0.1)
    x = torch.randint(0, 64, (2, 32))
    want = model(x)
    kernel = StandInFA3()
    use_fa3(model, kernel)
    got = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert kernel.calls == ([(8, 0), (-1, 0)] if options else [(-1, 0), (-1, 0)])  # S layer: sequence_len // 4
    use_fa3(model, None)
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_fa3_is_not_used_under_a_kv_cache():
    from nanochat.kv_cache import KVCache
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    kernel = StandInFA3()
    use_fa3(model, kernel)
    model(torch.randint(0, 64, (1, 4)), kv_cache=KVCache(1, 2, 16, 16, 1))
    assert kernel.calls == []


def test_fallbacks_say_why():
    cpu = torch.device("cpu")
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    before = [type(m) for m in model.modules()]
    assert enable_fp8(model, cpu) == ("--fp8: falling back to the compute dtype: fp8 matmuls need an NVIDIA GPU "
                                      "(sm89+), this run is on cpu")
    assert [type(m) for m in model.modules()] == before
    fa3, message = load_fa3(cpu, torch.bfloat16)
    assert fa3 is None and message == "--fa3: using SDPA: Flash Attention 3 needs an NVIDIA GPU, this run is on cpu"


def test_fp8_skips_small_gates():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                          value_embeds=True, smear=True))
    eligible = {n for n, m in model.named_modules() if fp8_eligible(m, n)}
    assert "transformer.h.0.attn.c_q" in eligible and "lm_head" in eligible
    assert not any("gate" in n for n in eligible)
