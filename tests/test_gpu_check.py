"""dev/gpu_check.sh --device cpu: every stage of the GPU check runs on CPU (tiny), the table lists each
one as ok with what it measured, and a failing stage makes the script exit non-zero."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["data", "tok_train", "base_train", "base_loss", "mid_train", "chat_sft", "chat_eval", "decode", "chat_web"]


def run_check(tmp_path, env_extra=None):
    env = dict(os.environ, NANOCHAT_PY=sys.executable, GPU_CHECK_DIR=str(tmp_path / "gc"), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_BASE_DIR"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run(["bash", "dev/gpu_check.sh", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("|", 3)]
        if len(cells) >= 4 and cells[0] in STAGES:
            rows[cells[0]] = cells
    return rows


def test_gpu_check_dry_run_on_cpu(tmp_path):
    p = run_check(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = table_rows(p.stdout)
    assert list(rows) == STAGES
    assert all(r[1] == "ok" for r in rows.values()), rows
    assert "tok/s" in rows["base_train"][3] and "mfu" in rows["base_train"][3]
    assert float(rows["base_loss"][3].split()[-1]) > 0
    assert "batch 1:" in rows["decode"][3] and "batch 8:" in rows["decode"][3]
    assert "tokens)" in rows["chat_web"][3]


def test_gpu_check_without_cuda_is_a_clear_error(tmp_path):
    env = dict(os.environ, NANOCHAT_PY=sys.executable, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run(["bash", "dev/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no CUDA device visible" in p.stderr
