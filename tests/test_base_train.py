"""base_train / base_loss end to end in subprocesses: checkpoints, losses, exact resume, and
2-process (gloo) training == 1 process with 2x gradient accumulation."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import complete_steps, load_checkpoint, model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "256",
        "--num-iterations", "8", "--eval-every", "4", "--eval-tokens", "256", "--warmdown-ratio", "0.5",
        "--peak-flops", "1e11", "--dtype", "float32", "--compile", "off"]
RTOL = 1e-4  # fp32 throughout; in practice the losses agree bit for bit


def run(base, args, nproc=1, expect_ok=True):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    if nproc == 1:
        cmd = [sys.executable, "-m"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", args[0], "--"] + args[1:]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def losses(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def linked_base(tmp, src):
    """A fresh base dir sharing src's data and tokenizer."""
    os.makedirs(tmp)
    for name in ("base_data", "tokenizer"):
        os.symlink(os.path.join(src, name), os.path.join(tmp, name))
    return str(tmp)


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    """One uninterrupted 8-step run (checkpoints at 4 and 8), shared by the tests below."""
    base = linked_base(tmp_path_factory.mktemp("bt") / "base", tiny_base_dir)
    loss_file = os.path.join(base, "full.jsonl")
    p = run(base, ["scripts.base_train", *TINY, "--save-every", "4", "--sample-every", "8", "--loss-file", loss_file])
    return base, loss_file, p.stdout


def test_train_writes_checkpoint_report_and_learns(trained, byte_tokenizer):
    base, loss_file, out = trained
    ckpt = os.path.join(base, "base_checkpoints", "d1")
    assert complete_steps(ckpt) == [4, 8]
    model_state, optim, meta = load_checkpoint(ckpt, 8, "cpu", load_optimizer=True)
    assert meta["step"] == 8 and meta["model_config"]["n_layer"] == 1 and meta["model_config"]["n_embd"] == 64
    assert meta["user_config"]["depth"] == 1 and len(meta["loader_states"]) == 1
    assert math.isfinite(meta["val_bpb"]) and len(optim["optimizers"]) == 2
    rec = losses(loss_file)
    assert [r["step"] for r in rec] == list(range(8))
    vals = [r["loss"] for r in rec]
    assert all(math.isfinite(v) for v in vals)
    assert abs(vals[0] - math.log(byte_tokenizer.get_vocab_size())) < 0.1  # zero-init blocks: uniform start
    assert vals[-1] < vals[0] - 0.5
    assert "tok/s" in out and "mfu" in out and "sample:" in out and "val bpb" in out
    report = os.path.join(base, "report")
    assert os.path.exists(os.path.join(report, "base-model-training.md"))
    assert os.path.getsize(os.path.join(report, "base_loss_curve.png")) > 1000


def test_kill_and_resume_matches_uninterrupted(trained):
    base, full_file, _ = trained
    part = os.path.join(base, "resumed.jsonl")
    args = ["scripts.base_train", *TINY, "--model-tag", "rs", "--loss-file", part]
    run(base, args + ["--save-every", "4", "--stop-after", "4"])  # "killed" right after the step-4 checkpoint
    assert complete_steps(os.path.join(base, "base_checkpoints", "rs")) == [4]
    run(base, args + ["--resume"])
    got, want = losses(part), losses(full_file)
    assert [r["step"] for r in got] == list(range(8))
    for g, w in zip(got, want):
        assert g["lrm"] == w["lrm"]
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), (g, w)
    # the final weights agree too
    a = torch.load(model_path(os.path.join(base, "base_checkpoints", "rs"), 8), weights_only=True)
    b = torch.load(model_path(os.path.join(base, "base_checkpoints", "d1"), 8), weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=1e-6)


def test_base_loss(trained):
    base, _, _ = trained
    p = run(base, ["scripts.base_loss", "--device-batch-size", "2", "--split-tokens", "512"])
    bpb = {}
    for line in p.stdout.splitlines():
        if line.startswith(("train bpb:", "val bpb:")):
            k, v = line.split(":")
            bpb[k] = float(v)
    assert set(bpb) == {"train bpb", "val bpb"} and all(0 < v < 8.1 for v in bpb.values())
    assert "sample: 'The capital of France is" in p.stdout
    assert os.path.exists(os.path.join(base, "report", "base-model-loss.md"))


def test_bad_total_batch_size_is_a_clear_error(base_dir):
    from scripts.base_train import main
    with pytest.raises(SystemExit, match="must be a multiple of .* = 2 x 64 x 1 = 128"):
        main(["--", *TINY, "--total-batch-size", "200"])


def test_depth_dial():
    from nanochat.training import lr_multiplier
    from scripts.base_train import model_config
    for depth in range(1, 33):
        c = model_config(depth, 128, 300)
        head_dim = c.n_embd // c.n_head
        assert c.n_embd == 64 * depth and c.n_embd % c.n_head == 0 and head_dim % 2 == 0
        assert head_dim == 128 or depth % 2 == 1  # even depths: exactly 128-wide heads
    assert model_config(1, 128, 300).n_head == 1 and model_config(20, 128, 300).n_head == 10
    sched = [lr_multiplier(s, 10, 0.5) for s in range(11)]
    assert sched[:6] == [1.0] * 6 and sched[6] == pytest.approx(0.8) and sched[10] == 0.0


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, make_docs, make_base_dir):
    """Rank r reads row groups r, r+2, ... while one process reads them all in order. With one
    document of exactly B*T bytes per row group (byte-level tokenizer: + bos = one B*T+1 window),
    rank r's micro-batch of step s is the single process's micro-batch 2s+r, so the two runs see
    the same data per step and must produce the same losses. The 2-process run is also killed and
    resumed halfway (per-rank optimizer shards and loader states)."""
    B, T = 2, 32
    docs = iter((d * 20)[:B * T] for d in make_docs(20, seed=5))
    base = make_base_dir(tmp_path / "base", [[[next(docs)] for _ in range(8)] for _ in range(2)] + [[[next(docs)] for _ in range(2)]])
    flags = ["--depth", "2", "--max-seq-len", str(T), "--device-batch-size", str(B), "--total-batch-size", str(2 * B * T),
             "--num-iterations", "6", "--eval-every", "-1", "--eval-tokens", str(2 * B * T), "--sample-every", "-1",
             "--warmdown-ratio", "0.5", "--peak-flops", "1e11", "--dtype", "float32", "--compile", "off"]
    one, two = os.path.join(base, "one.jsonl"), os.path.join(base, "two.jsonl")
    run(base, ["scripts.base_train", *flags, "--model-tag", "one", "--loss-file", one])
    two_args = ["scripts.base_train", *flags, "--model-tag", "two", "--loss-file", two]
    run(base, two_args + ["--stop-after", "3"], nproc=2)
    ckpt = os.path.join(base, "base_checkpoints", "two")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optim")) == ["optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    with open(os.path.join(ckpt, "meta_000003.json")) as f:
        assert len(json.load(f)["loader_states"]) == 2
    shutil.copytree(ckpt, os.path.join(base, "base_checkpoints", "three"))  # the same checkpoint, resumed on 1 rank
    run(base, two_args + ["--resume"], nproc=2)
    a, b = losses(one), losses(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=RTOL), (x, y)
    assert a[-1]["loss"] < a[0]["loss"] - 0.5
    # 2 ranks -> 1: the optimizer shards merge exactly, and with row group r of 2 ranks = row group 2s+r of one,
    # the resharded data position is exact here too, so the rest of the run is the 1-rank run's
    three = os.path.join(base, "three.jsonl")
    out = run(base, ["scripts.base_train", *flags, "--model-tag", "three", "--loss-file", three, "--resume"]).stdout
    assert "resharded a 2-rank checkpoint onto 1 ranks" in out
    c = losses(three)
    assert [r["step"] for r in c] == [3, 4, 5]
    for x, y in zip(a[3:], c):
        assert x["loss"] == pytest.approx(y["loss"], rel=RTOL), (x, y)
