"""The stages chained as speedrun.sh chains them, on tiny data: each reads the previous one's output
from NANOCHAT_BASE_DIR and the report ends up with their sections."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, env):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=env["CWD"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_tokenizer_and_base_stages(tmp_path, write_shards, make_docs):
    docs = iter(make_docs(3 * 2 * 20, seed=5))
    write_shards(str(tmp_path / "base" / "base_data"),
                 [[[next(docs) for _ in range(20)] for _ in range(2)] for _ in range(3)])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "PYTHONPATH": ROOT, "CWD": str(cwd),
           "OMP_NUM_THREADS": "1"}

    run("nanochat.report", "reset", env=env)
    out = run("scripts.tok_train", "--vocab-size", "300", "--max-chars", "50000", env=env)
    assert "trained in" in out
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(str(tmp_path / "base" / "tokenizer"))
    assert tok.get_vocab_size() == 300
    assert len(tok.encode("the cat sees the dog")) < len("the cat sees the dog")  # merges learned from the shards

    out = run("scripts.tok_eval", env=env)
    assert "| test |" in out  # the shards' source kind, with our bytes/token

    run("scripts.base_train", "--depth", "1", "--max-seq-len", "64", "--device-batch-size", "2",
        "--total-batch-size", "256", "--num-iterations", "4", "--eval-every", "2", "--eval-tokens", "512",
        "--sample-every", "-1", "--dtype", "float32", "--compile", "off", env=env)
    out = run("scripts.base_loss", "--split-tokens", "512", "--device-batch-size", "2", "--max-new-tokens", "4",
              env=env)
    assert "val bpb" in out

    run("nanochat.report", "generate", env=env)
    report = (cwd / "report.md").read_text()
    for section in ("Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss"):
        assert f"## {section}" in report
    assert "| val bpb |" in report  # the summary table has the BASE column filled
    assert (cwd / "report_assets" / "base_loss_curve.png").exists()


def test_speedrun_copy_drill_settings_and_per_tag_resume(tmp_path):
    """speedrun.sh's cpu copy drill: 300 steps unless CPU_COPY_STEPS says otherwise, its after-mixture names real
    tasks, and resume_flag looks at one tag, so a finished drill does not make the midtraining after it resume."""
    import re

    from tasks.mixtures import TASK_NAMES
    with open(os.path.join(ROOT, "speedrun.sh")) as f:
        text = f.read()
    assert "COPY_STEPS=${CPU_COPY_STEPS:-300}" in text  # on by default: the tools only help a model that copies
    mix = re.search(r'MID_AFTER_COPY="([^"]*)"', text).group(1).split(",")
    assert "copy" in mix and set(mix) <= set(TASK_NAMES)
    func = re.search(r"resume_flag\(\) \{.*?\n\}", text, re.S).group(0)
    os.makedirs(tmp_path / "mid_checkpoints" / "copydrill")
    (tmp_path / "mid_checkpoints" / "copydrill" / "meta_000010.json").write_text("{}")
    script = func + ('\necho "[$(resume_flag mid copydrill)] [$(resume_flag mid d4)] '
                     '[$(resume_flag mid)] [$(resume_flag chatsft)]"')
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_RESUME="1")
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[--resume] [] [--resume] []"
    env["NANOCHAT_RESUME"] = "0"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] [] [] []"
