"""Numerics decided once: compute_dtype's choice and its overrides, the model applying it itself (the same
numbers as autocast around it), the model-selection flags every script shares, the fp16 path's loss scaling,
and checkpoints whose optimizer states predate the tagging by kind."""
import argparse

import pytest
import torch

import nanochat.common
import nanochat.training
from nanochat.checkpoint_manager import add_model_args, save_checkpoint
from nanochat.common import compute_dtype
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import Run, Training, load_training_state, restore_training_state, start_run


def small_gpt(vocab=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))


def test_compute_dtype_flag_then_environment_then_hardware(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE")
    monkeypatch.setattr(nanochat.common, "native_bf16_cpu", lambda: False)
    assert compute_dtype("cpu") == torch.float32 and compute_dtype("mps") == torch.float32
    monkeypatch.setattr(nanochat.common, "native_bf16_cpu", lambda: True)
    assert compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert compute_dtype("cuda") == torch.float16  # a GPU older than bf16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    assert compute_dtype("cpu") == compute_dtype("cuda", "auto") == torch.float32
    assert compute_dtype("cpu", "float16") == torch.float16  # the flag beats the environment
    monkeypatch.setenv("NANOCHAT_DTYPE", "half")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE='half' is not a compute dtype: use one of bfloat16, "
                                         "float16, float32"):
        compute_dtype("cpu")


def test_the_model_applies_its_dtype_as_autocast_around_it_did():
    model = small_gpt()
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_logits, want_loss = model(x), model(x, x)
    seen = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    model.compute_dtype = torch.bfloat16
    logits, loss = model(x), model(x, x)
    assert torch.equal(logits, want_logits) and torch.equal(loss, want_loss)  # the same arithmetic, bit for bit
    assert seen == [torch.bfloat16] * 2 and logits.dtype == loss.dtype == torch.float32
    model.compute_dtype = torch.float32
    assert model(x).dtype == torch.float32 and seen[-1] == torch.float32


def test_every_model_loading_script_takes_the_same_model_flags():
    from scripts import (base_eval, base_loss, base_train, chat_cli, chat_dpo, chat_eval, chat_rl, chat_sft,
                         continual_train, mid_train)
    p = argparse.ArgumentParser()
    add_model_args(p, sources=["base", "sft"], source="sft")
    a = p.parse_args([])
    assert (a.source, a.model_tag, a.step, a.device_type, a.dtype) == ("sft", None, None, "", "auto")
    flags = ["-g", "d3", "--device-type", "cpu", "--dtype", "float16"]
    for script in (base_loss, base_eval, chat_cli, chat_rl, chat_dpo, mid_train, chat_sft, continual_train):
        a = script.parse_args(flags + ["-s", "7"])
        assert (a.model_tag, a.step, a.device_type, a.dtype) == ("d3", 7, "cpu", "float16"), script.__name__
    a = chat_eval.parse_args(flags + ["-i", "mid"])
    assert (a.source, a.model_tag, a.step, a.dtype) == ("mid", "d3", None, "float16")
    with pytest.raises(SystemExit):
        chat_eval.parse_args(flags)  # chat_eval names its stage
    a = base_train.parse_args(flags)  # writes checkpoints only: no --step
    assert (a.model_tag, a.device_type, a.dtype) == ("d3", "cpu", "float16") and not hasattr(a, "step")


def test_fp16_training_scales_the_loss_learns_and_skips_an_overflowing_step(monkeypatch, tmp_path):
    monkeypatch.setattr(nanochat.training, "compute_init", lambda device_type, seed: (False, 0, 0, 1,
                                                                                     torch.device("cpu")))
    args = argparse.Namespace(device_type="cpu", dtype="float16", compile="off", warmdown_ratio=0.0, keep_last=-1)
    run = start_run(args)
    assert run.dtype == torch.float16 and isinstance(run.scaler, torch.amp.GradScaler) and not run.compile
    model = small_gpt()
    training = Training(run, args, model, None, "t", str(tmp_path / "t"))
    assert model.compute_dtype == torch.float16
    training.begin(model.setup_optimizers(), {}, 20, {})
    x = torch.randint(0, 64, (4, 33))
    losses = []
    for step in range(12):
        loss = model(x[:, :-1], x[:, 1:])
        run.backward(loss)
        training.scheduled_update(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    # an overflowing gradient: the step is skipped (no weight moves) and the scale comes down
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = run.scaler.get_scale()
    run.backward(model(x[:, :-1], x[:, 1:]))
    model.lm_head.weight.grad[0, 0] = float("inf")
    training.update(1.0)
    assert run.scaler.get_scale() == scale / 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    training.update(1.0)  # no gradients at all (an RL step with nothing to learn): nothing moves, nothing breaks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_optimizer_states_saved_as_a_list_still_resume(tmp_path):
    model = small_gpt()
    opts = model.setup_optimizers()
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    for opt in opts.values():
        opt.step()
    old = {"optimizers": [opts["adamw"].state_dict(), opts["muon"].state_dict()], "rng": {"cpu": torch.get_rng_state()}}
    save_checkpoint(str(tmp_path), 3, model.state_dict(), old, {"step": 3, "world_size": 1})
    run = Run(False, 0, 1, torch.device("cpu"))
    fresh = model.setup_optimizers()
    restore_training_state(fresh, load_training_state(str(tmp_path), 3, {"world_size": 1}, run), model, run)
    for kind, opt in opts.items():
        for p in opt.state:
            for k, v in opt.state[p].items():
                assert torch.equal(torch.as_tensor(fresh[kind].state[p][k]), torch.as_tensor(v)), (kind, k)
