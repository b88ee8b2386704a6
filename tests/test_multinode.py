"""Two "nodes" on this machine: base_train under `torchrun --nnodes=2 --nproc_per_node=1` with a c10d
rendezvous on loopback trains exactly like one process with 2x gradient accumulation, and a run killed
halfway resumes on two nodes to the same losses."""
import os
import socket
import subprocess
import sys

import pytest
from test_base_train import losses, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(base, args):
    """Start both nodes' torchrun agents (as two machines would) and wait for both."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nanochat-test",
           "-m", args[0], "--"] + args[1:]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"node failed:\n{out[-3000:]}\n{err[-5000:]}"
    return "".join(o for o, _ in outs)


def test_two_nodes_equal_one_process_and_resume(tmp_path, make_docs, make_base_dir):
    B, T = 2, 32
    docs = iter((d * 20)[:B * T] for d in make_docs(20, seed=7))
    # one document of exactly B*T bytes per row group: rank r's micro-batch of step s is the single
    # process's micro-batch 2s+r (see test_base_train.test_two_ranks_equal_one_rank_with_accumulation)
    base = make_base_dir(tmp_path / "base", [[[next(docs)] for _ in range(8)] for _ in range(2)]
                         + [[[next(docs)] for _ in range(2)]])
    flags = ["--depth", "1", "--max-seq-len", str(T), "--device-batch-size", str(B), "--total-batch-size",
             str(2 * B * T), "--num-iterations", "4", "--eval-every", "-1", "--eval-tokens", str(2 * B * T),
             "--sample-every", "-1", "--warmdown-ratio", "0.5", "--peak-flops", "1e11", "--compile", "off"]
    one, two = os.path.join(base, "one.jsonl"), os.path.join(base, "two.jsonl")
    run(base, ["scripts.base_train", *flags, "--model-tag", "one", "--loss-file", one])
    two_args = ["scripts.base_train", *flags, "--model-tag", "two", "--loss-file", two]
    run_two_nodes(base, two_args + ["--stop-after", "2"])
    ckpt = os.path.join(base, "base_checkpoints", "two")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optim")) == ["optim_000002_rank0.pt",
                                                                            "optim_000002_rank1.pt"]
    run_two_nodes(base, two_args + ["--resume"])
    a, b = losses(one), losses(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(4))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x, y)
