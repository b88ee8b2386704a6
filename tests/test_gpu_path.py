"""The GPU path's settings that a CPU can check: speedrun's gpu profiles save periodically, a missing
wandb does not end a run, the bf16 residual stream, bucketed SFT padding, the device batch search."""
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def profile_flags(profile):
    """{VARIABLE: [flags]} of one profile in speedrun.sh's case block."""
    with open(os.path.join(ROOT, "speedrun.sh")) as f:
        text = f.read()
    blocks = re.findall(r"\n  ([a-z0-9|]+)\)\n(.*?);;", text[text.index('case "$NANOCHAT_PROFILE"'):], re.S)
    for names, body in blocks:
        if profile in names.split("|"):
            return {k: v.split() for k, v in re.findall(r'([A-Z_]+)="([^"]*)"', body)}
    raise AssertionError(f"no profile {profile} in speedrun.sh")


@pytest.mark.parametrize("profile", ["gpu8", "gpu1"])
def test_gpu_profiles_save_periodically_and_keep_two(profile):
    from scripts import base_train, chat_sft, mid_train
    flags = profile_flags(profile)
    for var, parse in (("BASE_TRAIN", base_train.parse_args), ("MID_TRAIN", mid_train.parse_args),
                       ("CHAT_SFT", chat_sft.parse_args)):
        args = parse(flags[var])  # every flag parses
        assert 0 < args.save_every <= 1000 and args.keep_last == 2, (var, args.save_every, args.keep_last)


def test_wandb_run_without_wandb_installed_warns_and_continues(monkeypatch, capsys):
    from nanochat.training import Run, init_wandb
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run = Run(False, 0, 1, torch.device("cpu"), "float32", False)
    assert init_wandb(run, "myrun", "nanochat", {}) is None
    out = capsys.readouterr().out
    assert "not installed" in out and "training continues" in out
    assert init_wandb(run, "dummy", "nanochat", {}) is None  # not asked: silent
    assert capsys.readouterr().out == ""


def block_input_dtypes(model, idx):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for b in model.transformer.h]
    with torch.amp.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    for h in hooks:
        h.remove()
    return seen, loss


def test_residual_stream_is_bf16_under_cuda_style_settings(tiny_model):
    model, config = tiny_model, tiny_model.config
    idx = torch.randint(0, config.vocab_size, (2, 16))
    assert model.residual_in_autocast_dtype is None  # default: only on CUDA, so fp32 here
    seen, ref = block_input_dtypes(model, idx)
    assert seen and set(seen) == {torch.float32}
    model.residual_in_autocast_dtype = True  # what CUDA does by default
    try:
        seen, loss = block_input_dtypes(model, idx)
    finally:
        model.residual_in_autocast_dtype = None
    assert set(seen) == {torch.bfloat16} and len(seen) == config.n_layer
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05  # same model, bf16 rounding only


def test_length_buckets():
    from nanochat.training import length_bucket
    assert [length_bucket(n, 2048) for n in (1, 256, 257, 600, 1024, 1500, 2048)] == [256, 256, 512, 1024, 1024, 2048, 2048]
    assert length_bucket(300, 400) == 400 and length_bucket(10, 64) == 64  # capped at max-seq-len


def test_bucketed_sft_padding_gives_the_unpadded_loss(byte_tokenizer, tiny_model):
    """Padding sits after every real token (causal attention never looks ahead) and its targets are -1,
    so padding a batch to its length bucket changes neither the summed loss nor the supervised tokens."""
    from nanochat.training import collate, length_bucket
    convs = [{"messages": [{"role": "user", "content": "hi " * k}, {"role": "assistant", "content": "yo " * (k + 1)}]}
             for k in (1, 4, 9)]
    rows = [byte_tokenizer.render_conversation(c, max_tokens=tiny_model.config.sequence_len + 1) for c in convs]
    T = tiny_model.config.sequence_len
    x0, y0 = collate(rows, 0, T=T)
    x1, y1 = collate(rows, 0, T=T, pad_to=length_bucket(x0.size(1), T, smallest=16))
    assert x1.size(1) > x0.size(1) and (y1 >= 0).sum() == (y0 >= 0).sum()
    import copy
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would hide any leak from the padding
            p.add_(torch.randn_like(p) * 0.05)
        a, b = model(x0, y0, loss_reduction="sum"), model(x1, y1, loss_reduction="sum")
        leaky = x1.clone()
        leaky[:, x0.size(1):] = 7  # other padding tokens: still the same loss
        c = model(leaky, y1, loss_reduction="sum")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
