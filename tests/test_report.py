import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from nanochat.report import Report


def test_report_sections_summary_and_plots(tmp_path):
    rep = Report(str(tmp_path / "report"))
    rep.reset()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 2, 1])
    png = rep.save_plot(fig, "curve.png")
    # logged out of order: generate must restore the pipeline order
    rep.log("Chat SFT", [{"steps": 10}], stage="SFT", summary={"ARC-Easy": 0.31})
    rep.log("Base model training", [{"depth": 4, "lr": 0.02}, "free text"], stage="BASE",
            summary={"val bpb": 1.2345, "ARC-Easy": 0.25}, images=[("loss", png)])
    rep.log("Tokenizer training", [{"vocab size": 4096}])
    out_dir = tmp_path / "cwd"
    out_dir.mkdir()
    path = rep.generate(copy_to=str(out_dir))
    text = open(path).read()
    assert text.index("## Tokenizer training") < text.index("## Base model training") < text.index("## Chat SFT")
    assert "- depth: 4" in text and "free text" in text and "### Hardware" in text
    assert "| ARC-Easy | 0.2500 | - | 0.3100 | - | - |" in text
    assert "| val bpb | 1.2345 | - | - | - | - |" in text
    assert "Total wall clock time" in text
    copied = (out_dir / "report.md").read_text()
    assert "](report_assets/curve.png)" in copied and "](curve.png)" in text
    assert (out_dir / "report_assets" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # reset clears old sections
    rep.reset()
    assert "Chat SFT" not in open(rep.generate()).read()
    assert not os.path.exists(tmp_path / "report" / "chat-sft.md")


def test_time_to_gpt2_core(tmp_path):
    """Online CORE at or past GPT-2's gives the base training time; below it, "not reached"; offline, no line."""
    rep = Report(str(tmp_path / "report"))
    rep.reset()
    rep.log("Base model training", [{"depth": 4}], stage="BASE", summary={"val bpb": 0.9},
            facts={"training_minutes": 99.5})
    rep.log("Base model evaluation", [], stage="BASE", summary={"CORE-offline": 0.4})
    assert "Time to GPT-2 CORE" not in open(rep.generate()).read()
    rep.log("Base model evaluation", [], stage="BASE", summary={"CORE": 0.2581})
    assert "Time to GPT-2 CORE (0.2565): 1h39m of base training (CORE 0.2581)" in open(rep.generate()).read()
    rep.log("Base model evaluation", [], stage="BASE", summary={"CORE": 0.2201})
    assert "not reached (CORE 0.2201 after 1h39m of base training)" in open(rep.generate()).read()
