"""chat_cli with learned adapters: --adapter NAME loads one through nanochat.lora.storage (checked against the
checkpoint's weights), several names with --adapter-weights make a stack; the replies are those of the model with
that stack active. A tiny SFT checkpoint and adapters made by the test, greedy decoding."""
import copy
import dataclasses
import io
import os

import pytest
import torch
import torch.nn as nn

from nanochat.checkpoint_manager import load_model, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora.adapter import LoRA
from nanochat.lora.storage import adapter_path, save_adapter
from nanochat.tools.registry import ToolRegistry
from scripts.chat_cli import chat_turn, main

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def checkpoint_with_adapters(base_dir):
    config = GPTConfig(sequence_len=128, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # zero-init projections would make every reply a function of one token
        for block in model.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        nn.init.normal_(model.lm_head.weight, std=0.1)
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d1"), 3, model.state_dict(), None,
                    {"step": 3, "model_config": dataclasses.asdict(config)})
    model, tok, _ = load_model("sft", torch.device("cpu"), phase="eval")
    lora = LoRA(copy.deepcopy(model))
    for seed, name in enumerate(("domain", "facts")):
        ad = lora.add(name, rank=4, alpha=8)
        with torch.no_grad():
            for p in ad.B:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
        save_adapter(lora, name, adapter_path(name))

    def reply(stack=None, weights=None):
        """What chat_turn prints with `stack` active on the checkpoint's weights."""
        lora.activate(stack, weights)
        out = io.StringIO()
        chat_turn(Engine(lora.model, tok, tools=ToolRegistry()), tok, USER, temperature=0.0, max_tokens=12, out=out)
        lora.activate(None)
        return out.getvalue()
    return reply


def run_cli(capsys, *flags):
    code = main(["-i", "sft", "--device-type", "cpu", "--dtype", "float32", "-p", "hi", "-t", "0", "--max-tokens", "12",
                 *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_cli_chats_with_an_adapter_and_with_a_stack(checkpoint_with_adapters, capsys):
    reply = checkpoint_with_adapters
    base, facts, stack = reply(), reply("facts"), reply(["domain", "facts"], [1.0, 0.5])
    assert len({base, facts, stack}) == 3  # each really is another model
    assert run_cli(capsys)[1] == base
    assert run_cli(capsys, "--adapter", "facts")[1] == facts
    assert run_cli(capsys, "--adapter", "domain", "facts", "--adapter-weights", "1", "0.5")[1] == stack
    # --dtype auto on a CPU that could pack the Linears runs the adapters unpacked: the same reply
    assert run_cli(capsys, "--adapter", "facts", "--dtype", "auto")[1] == facts


def test_chat_cli_says_which_adapter_it_cannot_use(checkpoint_with_adapters, capsys, base_dir):
    code, _, err = run_cli(capsys, "--adapter", "nope")
    assert code == 1 and "no adapter at" in err and "nope" in err
    code, _, err = run_cli(capsys, "--adapter", "../etc")
    assert code == 1 and "error:" in err
    with pytest.raises(SystemExit):  # argparse: one weight per name
        main(["-p", "hi", "--adapter", "domain", "facts", "--adapter-weights", "1"])
    assert "one each" in capsys.readouterr().err
