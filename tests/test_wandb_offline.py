"""wandb installed but not logged in: a training stage logs offline and says where, and a wandb that cannot start
at all never ends the run (nanochat.training.init_wandb). Nothing leaves the machine: no key, offline mode."""
import os

import pytest

from nanochat.training import Run, init_wandb

wandb = pytest.importorskip("wandb", reason="wandb is a dev dependency (pip install -e '.[dev]')")


@pytest.fixture
def no_key(tmp_path, monkeypatch):
    """No credentials anywhere wandb looks first (env, ~/.netrc), its files under tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def master():
    return Run(ddp=False, rank=0, world_size=1, device=None, dtype="float32", compile=False)


def test_without_a_key_a_stage_logs_offline_and_says_where(no_key, capsys):
    run = init_wandb(master(), "myrun", "nanochat-test", {"depth": 2})
    try:
        assert run is not None and run.settings.mode == "offline"
        run.log({"step": 0, "train/loss": 1.5})
    finally:
        run.finish()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("wandb: logging offline to "))
    where = line.split("logging offline to ")[1].split(" (")[0]
    assert os.path.isdir(where) and where.startswith(str(no_key / "wandb")) and f"wandb sync {where}" in line


def test_a_wandb_that_cannot_start_never_ends_the_run(no_key, monkeypatch, capsys):
    tried = []

    def broken_init(**kw):
        tried.append(kw["mode"])
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # a key: online is tried first, then offline
    assert init_wandb(master(), "myrun", "nanochat-test", {}) is None
    assert tried == ["online", "offline"]
    assert "training continues without wandb" in capsys.readouterr().out
