"""Checkpoint manager: round trip, atomicity under a crash, completeness, pruning, model lookup."""
import dataclasses
import os

import pytest
import torch

from nanochat import checkpoint_manager as cm


def trained_state(model):
    """Model + optimizers after one step, so the optimizers have state to save."""
    opts = model.setup_optimizers()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, x).backward()
    for opt in opts.values():
        opt.step()
    return model.state_dict(), [opt.state_dict() for opt in opts.values()]


def meta_for(model, step, **extra):
    return {"step": step, "model_config": dataclasses.asdict(model.config), **extra}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        assert a == b


def test_round_trip(tmp_path, tiny_model):
    model_state, optim_states = trained_state(tiny_model)
    meta = meta_for(tiny_model, 5, val_bpb=torch.tensor(1.25), loader_states=[{"epoch": 0, "rg": 1, "doc": 2, "tok": 3}])
    d = str(tmp_path / "d1")
    cm.save_checkpoint(d, 5, model_state, {"optimizers": optim_states}, meta)
    assert sorted(os.listdir(d)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    m, o, meta2 = cm.load_checkpoint(d, 5, "cpu", load_optimizer=True)
    assert_same(model_state, m)
    assert_same(optim_states, o["optimizers"])
    assert meta2["val_bpb"] == 1.25 and meta2["loader_states"] == meta["loader_states"]
    assert meta2["model_config"] == dataclasses.asdict(tiny_model.config)
    _, o, _ = cm.load_checkpoint(d, 5, "cpu")
    assert o is None


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    d = str(tmp_path / "d1")
    state = tiny_model.state_dict()
    cm.save_checkpoint(d, 1, state, None, meta_for(tiny_model, 1))
    before = sorted(os.listdir(d))

    real_replace = os.replace

    def crash_on(name):
        def replace(src, dst):
            if name in os.path.basename(dst):
                raise OSError("simulated crash")
            return real_replace(src, dst)
        return replace

    # crash while renaming the model file: nothing of step 2 appears, no temp files remain
    monkeypatch.setattr(os, "replace", crash_on("model_000002"))
    with pytest.raises(OSError, match="simulated crash"):
        cm.save_checkpoint(d, 2, {k: v + 1 for k, v in state.items()}, None, meta_for(tiny_model, 2))
    assert sorted(os.listdir(d)) == before

    # crash on the meta (model already renamed): step 2 is incomplete and ignored
    monkeypatch.setattr(os, "replace", crash_on("meta_000002"))
    with pytest.raises(OSError):
        cm.save_checkpoint(d, 2, {k: v + 1 for k, v in state.items()}, None, meta_for(tiny_model, 2))
    assert sorted(os.listdir(d)) == sorted(before + ["model_000002.pt"])
    assert cm.find_last_step(d) == 1
    m, _, meta = cm.load_checkpoint(d, 1, "cpu")
    assert_same(state, m) and meta["step"] == 1
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cm.load_checkpoint(d, 2, "cpu")


def test_find_last_step_and_prune(tmp_path, tiny_model):
    d = str(tmp_path / "d1")
    with pytest.raises(FileNotFoundError):
        cm.find_last_step(d)
    state = tiny_model.state_dict()
    for step in (10, 20, 30):
        cm.save_checkpoint(d, step, state, [], meta_for(tiny_model, step))
    torch.save(state, cm.model_path(d, 40))  # model without meta: an interrupted save
    assert cm.find_last_step(d) == 30
    cm.save_checkpoint(d, 50, state, [], meta_for(tiny_model, 50), keep_last=2)
    assert cm.complete_steps(d) == [30, 50]
    assert not os.path.exists(cm.optim_path(d, 20, 0)) and not os.path.exists(cm.model_path(d, 10))


def test_find_largest_model(tmp_path, tiny_model):
    root = tmp_path / "base_checkpoints"
    for tag in ("d4", "d20", "d3", "d100"):
        os.makedirs(root / tag)
    for tag in ("d4", "d20", "d3"):  # d100 has no complete checkpoint
        cm.save_checkpoint(str(root / tag), 1, tiny_model.state_dict(), None, meta_for(tiny_model, 1))
    assert cm.find_largest_model(str(root)) == "d20"


def test_load_model(base_dir, tiny_model):
    with pytest.raises(FileNotFoundError, match="scripts.base_train"):
        cm.load_model("base", "cpu", "eval")
    d = os.path.join(base_dir, "base_checkpoints", "d1")
    # saved from a compiled model: names carry the _orig_mod. prefix
    state = {"_orig_mod." + k: v for k, v in tiny_model.state_dict().items()}
    cm.save_checkpoint(d, 3, state, None, meta_for(tiny_model, 3))
    model, tok, meta = cm.load_model("base", "cpu", "eval")
    assert not model.training and meta["step"] == 3 and tok.get_vocab_size() == tiny_model.config.vocab_size
    x = torch.randint(0, tok.get_vocab_size(), (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), tiny_model.eval()(x))
    model, _, _ = cm.load_model("base", "cpu", "train", model_tag="d1", step=3)
    assert model.training
    with pytest.raises(FileNotFoundError, match="step 7"):
        cm.load_model("base", "cpu", "eval", step=7)
    with pytest.raises(FileNotFoundError, match="scripts.mid_train"):
        cm.load_model("mid", "cpu", "eval")


def test_start_fresh_moves_old_run_aside(tmp_path, tiny_model):
    d = str(tmp_path / "d1")
    assert cm.start_fresh(d) is None  # nothing there: nothing to do
    state = tiny_model.state_dict()
    cm.save_checkpoint(d, 900, state, [], meta_for(tiny_model, 900))
    prev = cm.start_fresh(d)
    assert prev == d + ".prev" and cm.complete_steps(prev) == [900]
    cm.save_checkpoint(d, 100, state, [], meta_for(tiny_model, 100))
    assert cm.find_last_step(d) == 100  # the old run's later step can't be mistaken for this run's
    cm.start_fresh(d)  # a second replacement keeps one generation only
    assert cm.complete_steps(d + ".prev") == [100]
