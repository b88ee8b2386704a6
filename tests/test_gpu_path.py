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
    run = Run(False, 0, 1, torch.device("cpu"))
    assert init_wandb(run, "myrun", "nanochat", {}) is None
    out = capsys.readouterr().out
    assert "not installed" in out and "training continues" in out
    assert init_wandb(run, "dummy", "nanochat", {}) is None  # not asked: silent
    assert capsys.readouterr().out == ""


def block_input_dtypes(model, idx):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for b in model.transformer.h]
    model.compute_dtype = torch.bfloat16
    try:
        loss = model(idx, idx)
    finally:
        model.compute_dtype = torch.float32
    for h in hooks:
        h.remove()
    return seen, loss


def test_residual_stream_is_bf16_under_cuda_style_settings(tiny_model, monkeypatch):
    import nanochat.gpt
    model, config = tiny_model, tiny_model.config
    idx = torch.randint(0, config.vocab_size, (2, 16))
    seen, ref = block_input_dtypes(model, idx)  # default: only on CUDA, so fp32 here
    assert seen and set(seen) == {torch.float32}
    # what CUDA does
    monkeypatch.setattr(nanochat.gpt, "residual_in_compute_dtype", lambda x, dtype: dtype == torch.bfloat16)
    seen, loss = block_input_dtypes(model, idx)
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


def test_device_batch_auto_halves_on_out_of_memory(capsys):
    from nanochat.hardware import device_batch_flag, fit_device_batch
    from nanochat.training import Run
    run = Run(False, 0, 1, torch.device("cpu"))
    tried = []

    def probe(b):  # pretends only 6 rows fit
        tried.append(b)
        if b > 6:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
    assert fit_device_batch(probe, 32, run) == 4 and tried == [32, 16, 8, 4]
    assert "device batch 8 runs out of memory, trying 4" in capsys.readouterr().out

    def never(b):
        raise torch.OutOfMemoryError("pretend")
    with pytest.raises(torch.OutOfMemoryError):
        fit_device_batch(never, 4, run)
    assert device_batch_flag("auto") == "auto" and device_batch_flag("12") == 12
    for bad in ("0", "-3", "big"):
        with pytest.raises(Exception, match="positive whole number or auto"):
            device_batch_flag(bad)


def test_device_batch_auto_keeps_the_total_batch(tiny_model):
    """On a device with room, auto takes the largest power of two whose micro-batch fits in the total batch."""
    import argparse
    from nanochat.hardware import resolve_device_batch
    from nanochat.training import Run, accumulation_steps
    run = Run(False, 0, 1, torch.device("cpu"))
    args = argparse.Namespace(device_batch_size="auto", total_batch_size=256)
    B = resolve_device_batch(args, tiny_model, 32, run)
    assert B == 8 and accumulation_steps(256, B, 32, 1) == 1
    assert all(p.grad is None for p in tiny_model.parameters())  # the probe leaves no gradients behind
    args.device_batch_size = 2
    assert resolve_device_batch(args, tiny_model, 32, run) == 2


def test_resharded_data_positions():
    from nanochat.reshard import reshard_row_group_positions, reshard_stream_positions
    # 2 ranks, rank 0 next at its row group 3 (global 6), rank 1 at 3 (global 7): one rank starts at global 6
    two = [{"epoch": 0, "rg": 3, "doc": 5, "tok": 9}, {"epoch": 0, "rg": 3, "doc": 0, "tok": 0}]
    assert reshard_row_group_positions(two, 1) == [{"epoch": 0, "rg": 6, "doc": 0, "tok": 0}]
    # 1 rank at global 7 -> 2 ranks: rank 0 reads 0, 2, 4, 6, 8 (next: 8 = its 4th), rank 1 reads 1, 3, 5, 7
    one = [{"epoch": 1, "rg": 7, "doc": 2, "tok": 1}]
    assert [p["rg"] for p in reshard_row_group_positions(one, 2)] == [4, 3]
    assert reshard_stream_positions([{"epoch": 0, "pos": 100}, {"epoch": 0, "pos": 120}], 1) == [{"epoch": 0, "pos": 200}]
    assert reshard_stream_positions([{"epoch": 2, "pos": 100}], 4) == [{"epoch": 2, "pos": 25}] * 4


def test_base_eval_prepares_data_before_the_process_group(monkeypatch, base_dir):
    """Preparing inside the distributed stage left the other ranks in an NCCL barrier for the whole download."""
    from scripts import base_eval
    calls = []

    class Stop(Exception):
        pass

    def compute_init(*a, **k):
        calls.append("compute_init")
        raise Stop
    monkeypatch.setattr(base_eval, "prepare_core_data", lambda tasks: calls.append(("prepare", tasks)))
    monkeypatch.setattr(base_eval, "compute_init", compute_init)
    with pytest.raises(Stop):
        base_eval.main(["--tasks", "arc_easy,copa", "--device-type", "cpu"])
    assert calls == [("prepare", ["arc_easy", "copa"]), "compute_init"]


def test_auto_numerics_follow_the_hardware(tmp_path, monkeypatch):
    import nanochat.common
    from nanochat.common import compute_dtype, native_bf16_cpu
    from nanochat.hardware import resolve_compile
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    plain.write_text("processor : 0\nflags\t\t: fpu sse2 avx2\n")
    assert native_bf16_cpu(str(amx)) and not native_bf16_cpu(str(plain))
    assert not native_bf16_cpu(str(tmp_path / "missing"))
    monkeypatch.delenv("NANOCHAT_DTYPE")
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(nanochat.common, "native_bf16_cpu", lambda: native)
        assert compute_dtype("cpu") == want and resolve_compile("auto", "cpu")
    assert compute_dtype("cpu", "float32") == torch.float32 and not resolve_compile("off", "cpu")
    assert compute_dtype("mps") == torch.float32 and not resolve_compile("auto", "mps")


def test_progress_line_marks_compile_warm_up(capsys):
    from nanochat.training import Run, StepLog
    log = StepLog(Run(False, 0, 1, torch.device("cpu"), compile=True), 10, 0, {})
    for step in range(4):
        log.step(step, 2.0, 1.0, 0.5, 1000)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [("compile warm-up" in line) for line in lines] == [True, True, True, False]


def test_loss_sums_avoid_float64_on_mps():
    from nanochat.common import sum_dtype
    assert sum_dtype("mps") == torch.float32  # MPS has no float64: a .double() there raises
    assert sum_dtype("cpu") == torch.float64 and sum_dtype(torch.device("cuda", 0)) == torch.float64
