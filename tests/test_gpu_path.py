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
